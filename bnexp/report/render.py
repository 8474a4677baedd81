"""The report as a list of blocks, rendered to Markdown or to one self-contained HTML page.

Text blocks and table cells may use `code`, **bold** and [links](relative/path) (the only inline
Markdown the HTML renderer converts). HTML embeds every figure as a base64 PNG and inlines its CSS,
so the page opens offline; a link to a figure's PNG becomes a link to the figure in the page, and
links to runs stay relative (they work while the report sits where it was written).
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
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} tr:nth-child(even) td{background:#fafafa}
code{background:#f4f4f4;padding:0 3px;border-radius:3px}
figure{margin:1.2em 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-style:italic;color:#444;margin-top:0.3em} .csv{color:#666;font-size:0.85em}
"""


def figure_id(b: Figure) -> str:
    """'fig-1-2' for a caption starting 'Figure 1.2:' (the anchor links to the figure point at)."""
    m = re.match(r"Figure (\d+)\.(\d+)", b.caption)
    return f"fig-{m[1]}-{m[2]}" if m else "fig-" + re.sub(r"[^A-Za-z0-9]+", "-", b.path.stem)


def _inline(text: str, anchors: dict[str, str] | None = None) -> str:
    t = html.escape(str(text))
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)

    def link(m: re.Match) -> str:
        href = (anchors or {}).get(html.unescape(m[2]), m[2])
        return f'<a href="{href}">{m[1]}</a>'
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", link, t)


def html_table(df: pd.DataFrame, anchors: dict[str, str] | None = None) -> str:
    """A plain HTML table whose cells get the same inline Markdown as text (code, bold, links)."""
    head = "".join(f"<th>{_inline(c, anchors)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_inline(v, anchors)}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(blocks: list[Block], title: str) -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    anchors = {b.path.name: "#" + figure_id(b) for b in blocks if isinstance(b, Figure)}
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text, anchors)}</h{b.level}>")
        elif isinstance(b, Text):
            out.append("".join(f"<p>{_inline(p, anchors)}</p>" for p in b.text.split("\n\n")))
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i, anchors)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            out.append(html_table(b.df, anchors))
            if b.csv:
                out.append(f"<div class=\"csv\">full numbers: <a href=\"{html.escape(b.csv)}\">"
                           f"{html.escape(b.csv)}</a> (beside this file)</div>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f"<figure id=\"{figure_id(b)}\"><img alt=\"{html.escape(b.caption)}\" "
                       f"src=\"data:image/png;base64,{data}\"><figcaption>{_inline(b.caption, anchors)} "
                       f"(<a href=\"{html.escape(b.path.name)}\">PNG</a>)</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)
