"""The HTML side of the report: escaping, number formats, tables, and the page being built.

``Page`` collects HTML parts in order and the figures, each drawn to a PNG file in the output folder
and embedded as a base64 data URI, so the page is one self-contained file. Every text that goes into
the markup is escaped with ``e``.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re

import torch

__all__ = ["CSS", "Page", "e", "safe_name", "pct", "count", "ratio", "table", "plain"]


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.removed td { color: #a02818; } .note { color: #555; font-size: 0.92em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; } code { background: #f4f4f4; padding: 0 0.2em; }
details summary { cursor: pointer; color: #1f6fb2; }
"""


# ---- markup helpers -------------------------------------------------------------------------------------------
def e(text) -> str:
    """``text`` as HTML-escaped markup (quotes too)."""
    return html.escape(str(text), quote=True)


def safe_name(name: str) -> str:
    """``name`` made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "layer"


def pct(v) -> str:
    """A fraction as a percentage with two decimals; "-" for None."""
    return "-" if v is None else f"{100.0 * v:.2f} %"


def count(v) -> str:
    """An integer with thousands separators; "-" for None."""
    return "-" if v is None else f"{int(v):,}"


def ratio(after, before) -> str:
    """``after / before`` as "0.50x"; "-" when either is missing."""
    return f"{after / before:.2f}x" if (after is not None and before) else "-"


def table(header: list, rows: list, row_classes: list | None = None, num_cols=()) -> str:
    """An HTML table of escaped cells; ``num_cols`` are right-aligned, ``row_classes`` CSS classes per row."""
    out = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{e(c)}</td>' if j in num_cols else f"<td>{e(c)}</td>"
                        for j, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


class Page:
    """The page being built: HTML parts in order, and the figures (each written as a PNG file in
    ``out_dir`` when added, then embedded)."""

    def __init__(self, out_dir: str):
        self.out_dir, self.parts, self.figures = out_dir, [], []

    def add(self, markup: str) -> None:
        """Append HTML (callers escape any text in it with ``_e``)."""
        self.parts.append(markup)

    def note(self, text: str) -> None:
        """Append a paragraph of plain text (escaped here)."""
        self.parts.append(f'<p class="note">{e(text)}</p>')

    def heading(self, level: int, text: str) -> None:
        self.parts.append(f"<h{level}>{e(text)}</h{level}>")

    def figure(self, draw, filename: str, caption: str, **kw) -> None:
        path = os.path.join(self.out_dir, filename)
        draw(path=path, **kw)
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        self.figures.append(filename)
        self.add(f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                 f"<figcaption>{e(caption)} ({e(filename)})</figcaption></figure>")


def plain(obj):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, tensors -> lists."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return plain(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)
