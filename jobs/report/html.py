"""The HTML of a report: a page of sections, tables, figures and preformatted text.

Everything is escaped here, once (texts from a run directory, such as config values,
quarantine reasons and error logs, are data, never markup); styles are inline, so the
page needs nothing but itself.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1320px; padding: 0 1em; color: #1b1f23; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
.meta { color: #57606a; } .note { color: #9a6700; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; display: block; margin: .5em 0; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 0.85em; max-height: 40em; }
nav a { margin-right: 1em; }
"""


class Raw(str):
    """Markup made here (a link), placed in a table cell as it is instead of escaped."""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers as a reader wants them: 4 significant digits, integers whole."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    """Rows of cells (numbers right-aligned and formatted by ``fmt``); no header with None."""
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = []
    for row in rows:
        cells = []
        for value in row:
            if isinstance(value, Raw):
                cells.append(f"<td>{value}</td>")
                continue
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f'<td class="num">{esc(fmt(value))}</td>' if numeric else f"<td>{esc(fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    return table(None, pairs)


def figure(data_uri: str, alt: str) -> str:
    return f'<img class="plot" src="{esc(data_uri)}" alt="{esc(alt)}">'


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{css}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>"


def link(href: str, text: str) -> Raw:
    return Raw(f'<a href="{esc(href)}">{esc(text)}</a>')


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole page: ``sections`` are (anchor, title, html) and get a navigation bar."""
    nav = "".join(f'<a href="#{esc(anchor)}">{esc(name)}</a>' for anchor, name, _ in sections)
    body = "".join(section(anchor, name, content) for anchor, name, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{esc(title)}</h1><p class=\"meta\">{esc(subtitle)}</p><nav>{nav}</nav>{body}</body></html>\n"
    )
