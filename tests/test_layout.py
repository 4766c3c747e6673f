"""The package keeps a one-way import flow and its core import light."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "chase"

# Every top-level module or subpackage of chase, and what it may import. The flow is one way:
# graph -> sparse | surgery -> slim -> sparsifier -> analysis/check/flops -> train -> cli.
ALLOWED: dict[str, set[str]] = {
    "nested": set(),
    "graph": {"nested"},
    "models": set(),
    "io": set(),
    "timing": {"nested"},
    "plots": set(),
    "sparse": {"graph"},
    "surgery": {"graph"},
    "slim": {"graph", "io", "surgery"},
    "sparsifier": {"nested", "graph", "sparse", "surgery", "slim", "io", "flops"},
    "flops": {"graph", "sparse"},
    "analysis": {"graph", "sparse", "sparsifier"},
    "check": {"nested", "graph", "flops", "slim", "sparsifier"},
    "onnx": {"timing"},
    "deploy": {"nested", "onnx"},
    "bench": {"timing", "onnx", "deploy"},
    "integrations": {"sparsifier", "flops", "io", "pretrained", "surgery", "nested", "hfconfig"},
    "profile": {"graph", "sparse", "sparsifier", "surgery", "timing", "bench", "deploy"},
    "card": set(),
    "hub": set(),
    "hfconfig": {"surgery"},
    "pretrained": {"graph", "io", "slim", "surgery", "models", "card", "hub", "hfconfig"},
}
_TRAINER = {"graph", "sparse", "surgery", "slim", "sparsifier", "io", "timing", "plots", "flops", "analysis"}
ALLOWED["train"] = _TRAINER | {"models", "onnx", "profile", "pretrained", "bench", "deploy"}
ALLOWED["cli"] = ALLOWED["train"] | {"bench", "check", "train"}
ALLOWED["__main__"] = {"cli"}  # python -m chase: the command line, as the console script
#: Model classes belong to chase.models (and to the user): the library works on any model, so its code
#: (identifiers and strings other than docstrings) never names one.
MODEL_NAMES = re.compile(
    r"ResNet|ResNeXt|VGG|MobileNet|BasicBlock|Bottleneck|ShuffleNet|Swin|ConvNeXt|CNBlock|EfficientNet|"
    r"DenseNet|Inception|GoogLeNet|RegNet|MaxViT|VisionTransformer|SqueezeNet|AlexNet|MNASNet"
)


def _unit(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0].removesuffix(".py")


def _module_name(path: pathlib.Path) -> str:
    parts = ["chase", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: pathlib.Path) -> set[str]:
    """Every ``chase.*`` module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "chase":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from chase.x import y` (module y)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "chase")
    return found


def _files() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def test_every_unit_has_a_place_in_the_flow():
    units = {_unit(p) for p in SRC.rglob("*.py")} - {"__init__", "py"}
    assert units <= set(ALLOWED), f"new module(s) {units - set(ALLOWED)}: give them a place in ALLOWED"


def test_one_way_imports():
    files = _files()
    for path in files.values():
        unit = _unit(path)
        if unit == "__init__":
            continue  # the package root re-exports the public API
        targets = {m.split(".")[1] for m in _imported(path) if m.count(".") >= 1 and m.split(".")[1]}
        bad = {t for t in targets if (f"chase.{t}" in files or t in ALLOWED)} - ALLOWED[unit] - {unit}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}: not allowed for chase.{unit}"


def test_no_import_cycles():
    files = _files()
    graph = {n: {m for m in _imported(p) if m in files and m != n} for n, p in files.items()}
    # A package's __init__ importing its own submodules is how packages work; the cycle that matters is
    # between modules (including lazy imports inside functions).
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if files[m].name == "__init__.py" and n.startswith(m + "."):
                continue  # a module importing its own package's re-exports
            if state.get(m) == 1:
                cycle = [*stack[stack.index(m) :], m]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_library_never_imports_the_cli():
    for name, path in _files().items():
        if _unit(path) not in ("cli", "__main__"):
            assert not any(m == "chase.cli" or m.startswith("chase.cli.") for m in _imported(path)), name


def _code_names(tree: ast.AST) -> list[str]:
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            out.append(n.id)
        elif isinstance(n, ast.Attribute):
            out.append(n.attr)
        elif isinstance(n, (ast.ClassDef, ast.FunctionDef)):
            out.append(n.name)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            out.append(n.value)
    return out


def test_no_model_names_in_the_library():
    for path in SRC.rglob("*.py"):
        if _unit(path) in ("models", "cli"):
            continue  # the model zoo, and the command line that offers it
        hits = sorted(
            {m.group(0) for s in _code_names(ast.parse(path.read_text())) for m in MODEL_NAMES.finditer(s)}
        )
        assert not hits, (
            f"{path.relative_to(SRC)} names model classes {hits}: the library must work on any model"
        )


def test_core_import_is_light():
    heavy = (
        "('torchvision', 'timm', 'matplotlib', 'yaml', 'tensorboard', 'onnx', 'onnxruntime', 'onnxscript', "
        "'transformers', 'huggingface_hub', 'safetensors')"
    )
    code = f"import sys, chase; print(','.join(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import chase pulled in {out}"
