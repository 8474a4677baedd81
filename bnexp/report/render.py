"""The report as a list of blocks, rendered to Markdown or to one self-contained HTML page.

Text blocks may use `code` and **bold** (the only inline Markdown the HTML renderer converts).
HTML embeds every figure as a base64 PNG and inlines its CSS, so the page opens offline.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    df: pd.DataFrame          # display strings
    csv: str | None = None    # the CSV beside the report holding the full numbers


@dataclass
class Figure:
    path: Path
    caption: str


Block = Heading | Text | Bullets | Table | Figure


# ---------------------------------------------------------------- Markdown

def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub pipe table (no tabulate needed: cells are already formatted strings)."""
    head = "| " + " | ".join(_md_cell(c) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Text):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Table):
            out.append(markdown_table(b.df) + (f"\n\n(full numbers: [{b.csv}]({b.csv}))" if b.csv else ""))
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}]({b.path.name})\n\n*{b.caption}*")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} tr:nth-child(even) td{background:#fafafa}
code{background:#f4f4f4;padding:0 3px;border-radius:3px}
figure{margin:1.2em 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-style:italic;color:#444;margin-top:0.3em} .csv{color:#666;font-size:0.85em}
"""


def _inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def to_html(blocks: list[Block], title: str) -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            out.append("".join(f"<p>{_inline(p)}</p>" for p in b.text.split("\n\n")))
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            out.append(b.df.to_html(index=False, border=0, escape=True))
            if b.csv:
                out.append(f"<div class=\"csv\">full numbers: {html.escape(b.csv)} (beside this file)</div>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(b.caption)}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)
