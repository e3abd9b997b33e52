"""The little markdown of ``logs/CITATION.md`` as HTML, without a markdown library.

Headings (``#``), paragraphs, ``- `` bullet lists, ``**bold**``, ``*italic*`` and
```` `code` ````; everything else is escaped text. That is all the methods text uses.
"""

from __future__ import annotations

import html
import re

_INLINE = (
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"<em>\1</em>"),
)


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, replacement in _INLINE:
        out = pattern.sub(replacement, out)
    return out


def markdown_to_html(text: str, *, heading_offset: int = 1) -> str:
    """Render minimal markdown as HTML.

    Parameters
    ----------
    text : str
        The markdown.
    heading_offset : int
        Added to each heading's level (``#`` becomes ``<h2>`` with 1), so that the text
        nests under the page's own headings.

    Returns
    -------
    str
        HTML, one block per line.
    """
    blocks: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = min(6, len(heading.group(1)) + heading_offset)
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif stripped.startswith(("- ", "* ")):
            if paragraph:
                flush()
            items.append(stripped[2:])
        elif items and line.startswith("  "):  # a list item wrapped onto the next line
            items[-1] += " " + stripped
        else:
            if items:
                flush()
            paragraph.append(stripped)
    flush()
    return "\n".join(blocks)
