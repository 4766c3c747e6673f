"""mkdocs hook: the benchmark pages show the committed results files of ``benchmarks/results/``.

- A line ``<!-- include-results: NAME.md -->`` in a page is replaced by ``benchmarks/results/NAME.md``
  with its headings one level down (the file's title becomes a section of the page) and its relative
  image links pointing at the copies below. A missing file fails the build.
- Every PNG under ``benchmarks/results/`` is published at the same relative path under ``benchmarks/``,
  so the pages in ``docs/benchmarks/`` show the plots without a copy of them in ``docs/``.

The numbers on the site are therefore the committed files themselves, never retyped.
"""

from __future__ import annotations

import pathlib
import re

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

INCLUDE = re.compile(r"^<!-- include-results: (?P<name>[\w./-]+\.md) -->[ \t]*$", re.M)
IMAGE = re.compile(r"(!\[[^\]]*\]\()(?!https?://|/)([^)\s]+\))")


def _results(config) -> pathlib.Path:
    return pathlib.Path(config["config_file_path"]).parent / "benchmarks" / "results"


def _demoted(text: str) -> str:
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out)


def on_files(files: Files, config) -> Files:
    results = _results(config)
    for png in sorted(results.rglob("*.png")):
        uri = f"benchmarks/{png.relative_to(results).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    results = _results(config)

    def include(match: re.Match) -> str:
        path = results / match.group("name")
        if not path.is_file():
            raise PluginError(f"{page.file.src_uri}: benchmarks/results/{match.group('name')} does not exist")
        sub = pathlib.PurePosixPath(match.group("name")).parent.as_posix()
        text = _demoted(path.read_text())
        if sub != ".":  # links relative to a subfolder of results/, from a page in docs/benchmarks/
            text = IMAGE.sub(lambda m: f"{m.group(1)}{sub}/{m.group(2)}", text)
        return text

    return INCLUDE.sub(include, markdown)
