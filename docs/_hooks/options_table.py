"""mkdocs hook: the channel options table is generated from the library.

A line ``<!-- channel-options -->`` in a page is replaced by
:func:`chase.sparsifier.specs.options_markdown`: every option of ``chase.ChannelSpec``, the budget kinds and
the cost models, with its default, its values and its help, so the docs never retype them.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"^<!-- channel-options -->[ \t]*$", re.M)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if not MARKER.search(markdown):
        return markdown
    from chase.sparsifier.specs import options_markdown

    return MARKER.sub(lambda _: options_markdown(), markdown)
