"""A tiny document model (headings, paragraphs, lists, tables, figures) rendered to Markdown and to a
self-contained HTML page (inline CSS, plots as ``data:`` URIs: it opens from disk with no server and no network).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}
figcaption{font-size:.85em;color:#555}
img{max-width:100%}
code{background:#f3f3f3;padding:0 .2em}
""".strip()


@dataclass
class Document:
    """An ordered list of blocks; ``figures`` maps a figure's name to its PNG bytes."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("list", list(items)))

    def table(self, frame: pd.DataFrame, max_rows: int | None = None, note: str = "") -> None:
        self.blocks.append(("table", (frame, max_rows, note)))

    def figure(self, name: str, caption: str) -> None:
        if name in self.figures:
            self.blocks.append(("figure", (name, caption)))


def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, blank for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def _rows(frame: pd.DataFrame, max_rows: int | None) -> tuple[list[str], list[list[str]], int]:
    shown = frame if max_rows is None else frame.head(max_rows)
    cells = [[fmt(v) for v in row] for row in shown.itertuples(index=False, name=None)]
    return [str(c) for c in frame.columns], cells, len(frame) - len(shown)


def to_markdown(doc: Document) -> str:
    """Markdown (GitHub flavour); figures refer to the PNG files written beside it."""
    out = [f"# {doc.title}", ""]
    for kind, body in doc.blocks:
        if kind == "h2":
            out += [f"## {body}", ""]
        elif kind == "p":
            out += [body, ""]
        elif kind == "list":
            out += [f"- {item}" for item in body] + [""]
        elif kind == "table":
            frame, max_rows, note = body
            header, cells, hidden = _rows(frame, max_rows)
            escape = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            out.append("| " + " | ".join(map(escape, header)) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(map(escape, row)) + " |" for row in cells]
            out.append("")
            if hidden:
                out += [f"({hidden} more rows in the CSV file)", ""]
            out += [note, ""] if note else []
        elif kind == "figure":
            name, caption = body
            out += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def to_html(doc: Document) -> str:
    """One HTML file holding everything, plots included."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(doc.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(doc.title)}</h1>",
    ]
    for kind, body in doc.blocks:
        if kind == "h2":
            out.append(f"<h2>{esc(body)}</h2>")
        elif kind == "p":
            out.append(f"<p>{esc(body)}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in body) + "</ul>")
        elif kind == "table":
            frame, max_rows, note = body
            header, cells, hidden = _rows(frame, max_rows)
            rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells)
            head = "".join(f"<th>{esc(h)}</th>" for h in header)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            if hidden:
                out.append(f"<p>({hidden} more rows in the CSV file)</p>")
            if note:
                out.append(f"<p>{esc(note)}</p>")
        elif kind == "figure":
            name, caption = body
            data = base64.b64encode(doc.figures[name]).decode("ascii")
            out.append(
                f'<figure id="{esc(name)}"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
