"""What a demo section hands back: its measured metrics and how to write itself into the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One Locate -> Steer -> Improve loop: `metrics` go to metrics.json, `parts` to the HTML report.

    ``parts`` are ``(kind, payload)`` pairs replayed onto a :class:`~mechscope.report.html.Report`:
    ``("section", heading)``, ``("text", paragraph)``, ``("note", paragraph)``, ``("table", (header,
    rows))`` or ``("figure", plotly_figure)``.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    parts: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, payload: Any) -> None:
        self.parts.append((kind, payload))

    def write(self, report: Any) -> None:
        writers: dict[str, Callable[[Any], None]] = {
            "section": report.section,
            "text": report.text,
            "note": lambda p: report.text(p, note=True),
            "table": lambda p: report.table(*p),
            "figure": report.figure,
        }
        for kind, payload in self.parts:
            writers[kind](payload)


def markdown_rows(table: str) -> tuple[list[str], list[list[str]]]:
    """A Markdown table (as the results' ``table()`` methods write) as a header and rows."""
    lines = [line.strip().strip("|") for line in table.strip().splitlines()]
    header = [c.strip().strip("`") for c in lines[0].split("|")]
    rows = [[c.strip().strip("`") for c in line.split("|")] for line in lines[2:]]
    return header, rows


def rates_figure(result: Any, title: str) -> Any:
    """Before/after bars of an evaluation's metrics that are rates or divergences (perplexity, on its own
    scale, stays in the table), target metrics first."""
    import plotly.graph_objects as go

    target = set(result.config.get("target", []))
    names = [m for m in result.metrics if not m.startswith("perplexity")]
    names = [m for m in names if m in target] + [m for m in names if m not in target]
    labels = [f"{m} (target)" if m in target else m for m in names]
    fig = go.Figure(
        [
            go.Bar(name="before", x=labels, y=[result.before(m) for m in names]),
            go.Bar(name="after", x=labels, y=[result.after(m) for m in names]),
        ]
    )
    return fig.update_layout(title=title, barmode="group", height=380)
