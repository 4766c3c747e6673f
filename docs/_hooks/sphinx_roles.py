"""mkdocs hook: show the Sphinx roles of the docstrings (``:func:`x```, ``:class:`~a.B```) as code.

The docstrings name other objects the Sphinx way; Markdown renders the role's name literally
(``:func:<code>x</code>``). This hook drops the role from the rendered pages and keeps the code, with
Sphinx's ``~`` shortening (``~a.B`` shows ``B``).
"""

from __future__ import annotations

import re

ROLE = re.compile(
    r":(?:py:)?(?:attr|class|data|exc|func|meth|mod|obj):<code>(?P<short>~?)(?P<name>[^<]*)</code>"
)


def _code(match: re.Match) -> str:
    name = match.group("name")
    return f"<code>{name.rsplit('.', 1)[-1] if match.group('short') else name}</code>"


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(_code, html)
