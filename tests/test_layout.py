"""The package keeps a one-way import flow and its core import light."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "chase"

# Each subpackage may import only from the subpackages listed for it (and itself).
ALLOWED = {
    "graph": set(),
    "models": set(),
    "sparse": {"graph"},
    "surgery": {"graph"},
    "sparsifier": {"graph", "sparse", "surgery"},
}
TOP = {"train", "export", "bench", "flops", "analysis", "check", "cli", "integrations", "onnx"}


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chase."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("chase."))
    return found


def test_one_way_imports():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        pkg = rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] != "__init__.py" else "__init__"
        if pkg == "__init__" or pkg in TOP or pkg == "_version":
            continue
        assert pkg in ALLOWED, f"new subpackage {pkg}: add it to the import-flow table"
        bad = _imports(path) - ALLOWED[pkg] - {pkg}
        assert not bad, (
            f"{path.relative_to(SRC)} imports {bad}: the flow is graph -> sparse | surgery -> sparsifier"
        )


def test_core_import_is_light():
    heavy = (
        "('torchvision', 'timm', 'matplotlib', 'yaml', 'tensorboard', 'onnx', 'onnxruntime', 'onnxscript')"
    )
    code = f"import sys, chase; print(','.join(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import chase pulled in {out}"
