"""The HTML skeleton and inline style of the report: no script, font or file fetched."""

from __future__ import annotations

STYLE = """
body { font-family: sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 1em 3em;
       color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #aaa; margin-top: 2em; }
h3 { margin: 1.2em 0 .4em; }
nav ul { list-style: none; padding: 0; }
nav li { display: inline-block; margin-right: 1.2em; }
table { border-collapse: collapse; margin: .3em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: left; vertical-align: top; }
table.kv th { background: #f2f2f2; white-space: nowrap; }
table.grid th { background: #f2f2f2; }
figure { margin: 1em 0; }
figure img { max-width: 100%; display: block; border: 1px solid #ddd; }
figcaption { margin-bottom: .3em; font-size: .92em; }
.badge { font-size: .6em; padding: .1em .5em; border-radius: .3em; color: white;
         vertical-align: middle; }
.badge.ok { background: #2a7d2a; }
.badge.failed { background: #b22222; }
.error { background: #fde8e8; border-left: 4px solid #b22222; padding: .5em .8em;
         font-family: monospace; white-space: pre-wrap; word-break: break-word; }
.warnings li { color: #8a4b00; }
.source { color: #666; font-family: monospace; font-size: .9em; }
#methods { font-size: .92em; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
</body>
</html>
"""


def render_page(title: str, body: str) -> str:
    """The complete HTML document (``title`` already escaped, ``body`` HTML)."""
    return PAGE.format(title=title, style=STYLE, body=body)
