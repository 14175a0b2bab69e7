"""HTML output: a self-contained report (sections of text, tables, plotly figures) and single figures.

Figures written one per file share one copy of plotly.js (``plotly.min.js`` beside them, written once per
folder) instead of embedding the 4.8 MB library in every file; every page still opens offline.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechscope.errors import ConfigError
from mechscope.io import write_text_atomic

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2rem auto;padding:0 1rem;
color:#1d232a;line-height:1.5}
h1{border-bottom:2px solid #3b6ea8;padding-bottom:.3rem}h2{color:#3b6ea8;margin-top:2.2rem}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #c9d1d9;padding:.3rem .7rem;text-align:right}
th{background:#eef3f8}td:first-child,th:first-child{text-align:left}.note{color:#57606a;font-size:.92em}
"""


@dataclass
class Report:
    """Build with :meth:`section`, :meth:`text`, :meth:`table`, :meth:`figure`; write with :meth:`save`."""

    title: str
    blocks: list[str] = field(default_factory=list)
    _figures: int = 0

    def section(self, heading: str) -> None:
        self.blocks.append(f"<h2>{html.escape(heading)}</h2>")

    def text(self, paragraph: str, *, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{html.escape(paragraph)}</p>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.blocks.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig: Any) -> None:
        """Embed a plotly figure; plotly.js is inlined once, so the page needs no network."""
        include = self._figures == 0
        self._figures += 1
        self.blocks.append(fig.to_html(full_html=False, include_plotlyjs=include))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.blocks)}"
            "</body></html>"
        )
        return write_text_atomic(path, page)  # a hidden temporary per writer, then a rename


PLOTLY_JS = "plotly.min.js"


def write_figure(fig: Any, path: str | Path, *, plotlyjs: Literal["shared", "inline"] = "shared") -> Path:
    """Write a plotly figure as a full HTML page at `path`.

    ``"shared"`` (default): the page loads ``plotly.min.js`` from its own folder, which is written there
    once (an existing copy is kept), so a folder of figures holds the library once. ``"inline"``: the
    library is embedded (one self-contained file, ~4.8 MB).
    """
    if plotlyjs not in ("shared", "inline"):
        raise ConfigError(f"plotlyjs must be 'shared' or 'inline'; got {plotlyjs!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs="directory" if plotlyjs == "shared" else True, full_html=True)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
