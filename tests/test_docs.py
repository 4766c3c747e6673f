"""The documentation site: it builds strictly, its examples run, and the API reference is complete.

Conventions (docs/contributing.md): a fenced ```python block directly after a ``<!-- run -->`` line is
executed (in a fresh namespace, in a temporary working directory); a fenced block directly after a
``<!-- output -->`` line that follows a runnable block must equal what that block printed (``...``
matching any text, as in doctest). Every other python block must compile and name only ``chase``
objects that exist, and every ``chase`` command in a bash block must use existing subcommands and
options.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import doctest
import html
import importlib
import importlib.util
import io
import itertools
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import chase

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
#: the pages whose code blocks are checked: the site and the README (which repeats one example).
SOURCES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
MARKERS = {"<!-- run -->": "run", "<!-- output -->": "output"}


@dataclasses.dataclass
class Block:
    path: pathlib.Path
    line: int
    lang: str
    marker: str
    code: str
    output: str | None = None  # the expected output of a runnable block, when the page shows it

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(path: pathlib.Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end]) + "\n"
        marker = MARKERS.get(lines[i - 1].strip(), "") if i else ""
        found.append(Block(path, i + 1, lang, marker, code))
        i = end + 1
    for prev, block in itertools.pairwise(found):
        if block.marker == "output":
            assert prev.marker == "run", f"{block.where}: an output block must follow a runnable block"
            prev.output = block.code
    return found


BLOCKS = [b for p in SOURCES for b in _blocks(p)]
RUNNABLE = [b for b in BLOCKS if b.marker == "run"]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def test_markers_are_used_as_documented():
    assert len(RUNNABLE) >= 10, "the docs lost their runnable examples"
    for b in BLOCKS:
        if b.marker == "run":
            assert b.lang == "python", f"{b.where}: only python blocks can be marked runnable"
    for p in SOURCES:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith("<!--") and re.search(r"\b(run|output)\b", s):
                assert s in MARKERS, f"{p.relative_to(ROOT)}:{n}: unknown marker {s!r}"


# ---------------------------------------------------------------------------------------------- the build
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    """The site built with ``mkdocs build --strict`` (every warning fails it)."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[docs]' (the test extra has it)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, f"mkdocs build warned:\n{log}"
    return out


def test_site_builds_strictly_with_benchmark_plots(site):
    assert (site / "index.html").is_file()
    # the benchmark pages include the committed results files, and their plots come along (the hook)
    results = ROOT / "benchmarks" / "results"
    for png in results.rglob("*.png"):
        assert (site / "benchmarks" / png.relative_to(results)).is_file(), png
    # every results file is on a benchmark page, and shows there (its title, from the file itself)
    included = {}
    for page in sorted((DOCS / "benchmarks").glob("*.md")):
        for name in re.findall(r"^<!-- include-results: (\S+) -->$", page.read_text(), re.M):
            included[name] = page
    for md in sorted(results.rglob("*.md")):
        name = md.relative_to(results).as_posix()
        assert name in included, f"benchmarks/results/{name} is on no page of docs/benchmarks/"
        title = md.read_text().splitlines()[0].lstrip("# ")
        built = site / "benchmarks" / included[name].stem / "index.html"
        assert html.escape(title, quote=False) in built.read_text(), f"{name} is not rendered"
    changelog = (site / "changelog" / "index.html").read_text()
    assert "Keep a Changelog" in changelog


def test_the_channel_options_table_is_generated_from_the_specs(site):
    from chase.sparsifier.specs import flat_options

    source = (API / "index.md").read_text()
    assert "<!-- channel-options -->" in source and "| `channel_sparsity` |" not in source  # not retyped
    page = (site / "api" / "index.html").read_text()
    for name, option in flat_options().items():
        assert f"<code>{name}</code>" in page, f"option {name} is not in the generated table"
        words = " ".join(re.split(r"[`(:;]", option.help)[0].split()[:4])  # the help's plain start
        assert html.escape(words, quote=False) in page, name


# ---------------------------------------------------------------------------------------------- the API
def test_every_public_name_is_documented_in_the_api_reference(site):
    griffe = pytest.importorskip("griffe")
    package = griffe.load("chase", search_paths=[str(ROOT / "src")], resolve_aliases=True)
    reference = "\n".join(p.read_text() for p in sorted(API.glob("*.md")))
    page = (site / "api" / "chase" / "index.html").read_text()
    for name in chase.__all__:
        assert package[name].docstring, f"chase.{name} has no docstring"
        assert re.search(rf"^::: chase\.{re.escape(name)}$", reference, re.M), f"chase.{name} not in docs/api"
        assert f'id="chase.{name}"' in page, f"chase.{name} is not rendered on the API page"
    for module in ("chase.slim", "chase.surgery", "chase.models", "chase.train"):
        assert re.search(rf"^::: {re.escape(module)}$", reference, re.M), f"{module} not in docs/api"


# ---------------------------------------------------------------------------------------------- examples
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_example(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    out = io.StringIO()
    namespace = {"__name__": "__docs_example__"}
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, block.where, "exec"), namespace)
    if block.output is not None:  # "..." in the shown output stands for any text, as in doctest
        want, got = block.output.rstrip() + "\n", out.getvalue().rstrip() + "\n"
        same = doctest.OutputChecker().check_output(want, got, doctest.ELLIPSIS)
        assert same, f"{block.where}: the output shown differs from what the code prints:\n{got}"


def _chase_names(tree: ast.AST) -> set[str]:
    """Dotted ``chase.*`` names a block uses (attribute chains on ``chase``, ``from chase... import``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "chase":
                names.add(".".join(["chase", *reversed(parts)]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "chase":
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _resolve(dotted: str) -> None:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return
    raise ImportError(dotted)


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_is_correct_code(block):
    tree = ast.parse(block.code, block.where)
    for name in sorted(_chase_names(tree)):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            pytest.fail(f"{block.where}: {name} does not exist")


def _options() -> dict[str, set[str]]:
    from chase.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def test_chase_commands_in_the_docs_exist():
    options = _options()
    checked = 0
    for block in BLOCKS:
        if block.lang not in ("bash", "sh", "console"):
            continue
        for line in block.code.splitlines():
            for command in line.split(" #")[0].split("&&"):
                words = command.split()
                if "-m" in words and "chase.cli" in words:  # torchrun ... -m chase.cli train
                    words = words[words.index("chase.cli") :]
                if not words or pathlib.PurePath(words[0]).name not in ("chase", "chase.cli"):
                    continue
                sub = words[1]
                if sub.startswith("-"):
                    assert sub in ("-h", "--help"), f"{block.where}: `chase` has no option {sub}"
                    continue
                assert sub in options, f"{block.where}: no command `chase {sub}`"
                for word in words[2:]:
                    flag = word.strip("[]").split("=")[0]
                    if flag.startswith("-") and flag not in ("-", "--"):
                        assert flag in options[sub], f"{block.where}: `chase {sub}` has no option {flag}"
                checked += 1
    assert checked >= 20


def test_readme_set_up_commands_are_the_docs():
    readme = [b.code for b in _blocks(ROOT / "README.md") if b.lang == "bash"]
    start = [b.code for b in _blocks(DOCS / "get-started.md") if b.lang == "bash"]
    setup = [c for c in readme if c.startswith("python3 -m venv .venv")]
    assert len(setup) == 2 and all(c in start for c in setup)
