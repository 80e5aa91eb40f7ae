"""One report, two renderings: Markdown (for READMEs, images as files beside it) and a single
self-contained HTML page (tables and PNGs inline as base64, no scripts, no external assets), so
the page opens from the MLflow UI's artifact view, which shows one file at a time.

A report is a list of blocks ``(kind, payload)``; each kind has one renderer per format in a
registry, so a new kind of block is one function per format and one line each. Reports written
as Markdown text (robust searches, leaderboards) get the same page through ``markdown_page``:
CommonMark with tables (markdown-it-py), images inlined, the same style.
"""
from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from d3tune.numbers import fmt

Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"table"|"img", payload)


def _cells(table: pd.DataFrame) -> list[list[str]]:
    """Column by column (a row Series would upcast an int column to float: 32 -> 32.0)."""
    cols = [[fmt(v) for v in table[c].tolist()] for c in table.columns]
    return [list(r) for r in zip(*cols)] if cols else []


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_table(table: pd.DataFrame, _: Path) -> str:
    head = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    return "\n".join([head, rule] + ["| " + " | ".join(r) + " |" for r in _cells(table)])


MARKDOWN: dict[str, Callable[[Any, Path], str]] = {
    "h1": lambda t, _: f"# {t}",
    "h2": lambda t, _: f"## {t}",
    "p": lambda t, _: str(t),
    "table": _md_table,
    "img": lambda p, base: f"![{Path(p).stem}]({_relative(Path(p), base)})",
}


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def to_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown with images referenced relative to ``base`` (the folder report.md goes in)."""
    return "\n\n".join(MARKDOWN[kind](payload, base) for kind, payload in blocks) + "\n"


# ---------------------------------------------------------------------------------------------
# HTML


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in _cells(table))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_img(path: Any) -> str:
    alt = html.escape(Path(path).stem)
    return f'<figure><img alt="{alt}" src="{_data_uri(Path(path))}"></figure>'


HTML: dict[str, Callable[[Any], str]] = {
    "h1": lambda t: f"<h1>{html.escape(str(t))}</h1>",
    "h2": lambda t: f"<h2>{html.escape(str(t))}</h2>",
    "p": lambda t: f"<p>{html.escape(str(t))}</p>",
    "table": _html_table,
    "img": _html_img,
}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;
max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
img{max-width:100%;height:auto}figure{margin:.8em 0}p{max-width:70em;line-height:1.4}
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained page: inline CSS, inline PNGs, nothing fetched."""
    return _page("\n".join(HTML[kind](payload) for kind, payload in blocks) + "\n", title)


def _page(body: str, title: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}</body></html>\n")


def markdown_page(markdown: str, base: Path, title: str) -> str:
    """A Markdown report as one self-contained page: tables rendered, every local image
    (relative to ``base``, the folder the Markdown sits in) inlined as base64."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)

    def inline(match: re.Match[str]) -> str:
        src = html.unescape(match.group(1))
        path = base / src
        if "://" in src or not path.is_file():
            return match.group(0)
        return f'src="{_data_uri(path)}"'

    return _page(re.sub(r'src="([^"]+)"', inline, body), title)
