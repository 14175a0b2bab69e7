"""HTML of the viewer's pages. Every string that comes from a store passes through :func:`e` (HTML-escaped,
quotes included); figure JSON goes into ``<script type="application/json">`` with ``<``, ``>`` and ``&``
escaped, so no stored text can close the element or run as script."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from mechscope.records import Comparison, RunRecord
from mechscope.viewer.figures import ShownFile


def e(value: Any) -> str:
    """HTML-escape anything (None shows as an em dash)."""
    if value is None:
        return "—"
    if isinstance(value, float):
        value = f"{value:.6g}"
    return html.escape(str(value), quote=True)


def script_json(text: str) -> str:
    """JSON made safe inside a <script> element."""
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def run_href(run_id: str) -> str:
    return "/runs/" + quote(run_id, safe="")


def page(title: str, body: str, *, store: str, figures: bool = False) -> str:
    scripts = (
        '<script src="/static/plotly.min.js"></script><script src="/static/viewer.js"></script>' if figures else ""
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{e(title)}</title>"
        "<link rel='stylesheet' href='/static/viewer.css'></head><body>"
        f"<header><a class='home' href='/'>mechscope runs</a><span class='store'>{e(store)}</span></header>"
        f"<main>{body}</main>{scripts}</body></html>"
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "", raw: bool = False) -> str:
    """A table; cells are escaped unless `raw` (then the caller escaped them)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{e(cls)}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status(status: str) -> str:
    return f"<span class='status status-{e(status)}'>{e(status)}</span>"


def _options(name: str, values: Sequence[str], chosen: str, label: str) -> str:
    opts = [f"<option value=''>{e(label)}</option>"]
    opts += [f"<option value='{e(v)}'{' selected' if v == chosen else ''}>{e(v)}</option>" for v in values]
    return f"<select name='{e(name)}' id='filter-{e(name)}'>{''.join(opts)}</select>"


# List -----------------------------------------------------------------------------------------------
def list_page(
    runs: Sequence[RunRecord],
    *,
    store: str,
    filters: dict[str, str],
    tags: Sequence[str],
    methods: Sequence[str],
    total: int,
    matched: int | None = None,
) -> str:
    form = (
        "<form class='filters' method='get' action='/' id='filters'>"
        f"<input type='search' name='q' id='filter-q' placeholder='name, description or id' value='{e(filters['q'])}'>"
        f"{_options('tag', tags, filters['tag'], 'any tag')}"
        f"{_options('method', methods, filters['method'], 'any method')}"
        f"{_options('status', ['running', 'finished', 'failed'], filters['status'], 'any status')}"
        "<button type='submit'>filter</button> <a href='/'>clear</a></form>"
    )
    rows = []
    for r in runs:
        model = r.models[0].fingerprint if r.models else ""
        rows.append(
            [
                f"<input type='checkbox' name='id' value='{e(r.id)}' aria-label='compare {e(r.id)}'>",
                f"<a class='run-link' href='{e(run_href(r.id))}'>{e(r.name)}</a>",
                f"<code>{e(r.id)}</code>",
                _status(r.status),
                e(r.method),
                " ".join(f"<span class='tag'>{e(t)}</span>" for t in r.tags),
                e(r.started_at[:19].replace("T", " ")),
                e(None if r.wall_s is None else f"{r.wall_s:.2f} s"),
                f"<code>{e(model)}</code>",
                e(len(r.metrics)),
                e(len(r.artifacts)),
            ]
        )
    table = _table(
        ["", "name", "id", "status", "method", "tags", "started (UTC)", "wall", "model", "metrics", "files"],
        rows,
        cls="runs",
        raw=True,
    )
    matched = len(runs) if matched is None else matched
    more = f" (the newest {len(runs)} of {matched} that match are shown)" if matched > len(runs) else ""
    shown = f"<p class='count' id='run-count'>{matched} of {total} runs{e(more)}</p>"
    compare = (
        f"<form method='get' action='/compare' id='compare-form'>{table}"
        "<button type='submit'>compare selected</button></form>"
        if runs
        else "<p class='empty'>No runs match. Record some with <code>records.run(...)</code> or "
        "<code>--record</code>.</p>"
    )
    return page("mechscope runs", f"<h1>Runs</h1>{form}{shown}{compare}", store=store)


# One run ----------------------------------------------------------------------------------------------
def _provenance_rows(r: RunRecord) -> list[list[str]]:
    git = r.git_commit or "not in a git work tree"
    if r.git_commit and r.git_dirty:
        git += " (uncommitted changes)"
    rows = [
        ["id", r.id],
        ["status", r.status],
        ["method", r.method],
        ["seed", "" if r.seed is None else str(r.seed)],
        ["started (UTC)", r.started_at],
        ["ended (UTC)", r.ended_at or ""],
        ["wall time", "" if r.wall_s is None else f"{r.wall_s:.3f} s"],
        ["git commit", git],
        ["working directory", r.cwd],
        ["command", r.command],
        ["tags", ", ".join(r.tags)],
    ]
    rows += [[f"version: {k}", v] for k, v in sorted(r.versions.items())]
    return rows


def _figure_div(fig_id: str, figure_json: str, *, title: str = "") -> str:
    return (
        f"<div class='figure' id='{e(fig_id)}' data-figure='{e(fig_id)}-data' aria-label='{e(title)}'></div>"
        f"<script type='application/json' id='{e(fig_id)}-data'>{script_json(figure_json)}</script>"
    )


def _file_block(run_id: str, index: int, shown: ShownFile) -> str:
    parts = [f"<h3>{e(shown.name)} <small>({e(shown.role)})</small></h3>"]
    if shown.missing:
        parts.append(f"<p class='missing'>{e(shown.missing)}</p>")
        return "<section class='file'>" + "".join(parts) + "</section>"
    href = f"/runs/{quote(run_id, safe='')}/files/{quote(shown.name, safe='')}"
    parts.append(f"<p class='file-path'><code>{e(shown.relative_path)}</code> <a href='{e(href)}'>download</a></p>")
    if shown.problem:
        parts.append(f"<p class='problem'>{e(shown.problem)}</p>")
    if len(shown.plottable) > 1:
        links = []
        for t in shown.plottable:
            if t == shown.tensor:
                links.append(f"<strong>{e(t)}</strong>")
            else:
                query = urlencode({"tensor": f"{shown.name}:{t}"})
                links.append(f"<a class='tensor-link' href='{e(run_href(run_id))}?{e(query)}'>{e(t)}</a>")
        parts.append("<p class='tensors'>tensor: " + " · ".join(links) + "</p>")
    if shown.figure:
        parts.append(_figure_div(f"fig-{index}", shown.figure, title=shown.name))
    for title, header, rows in shown.tables:
        parts.append(f"<h4>{e(title)}</h4>" + _table(header, rows, cls="result-table"))
    if shown.header:
        meta = [[k, v if isinstance(v, str) else json.dumps(v, indent=1, default=str)] for k, v in shown.header.items()]
        parts.append(
            "<details><summary>file header</summary>" + _table(["key", "value"], meta, cls="meta") + "</details>"
        )
    if shown.tensors:
        parts.append(
            "<details><summary>tensors</summary>" + _table(["tensor", "dtype", "shape"], shown.tensors) + "</details>"
        )
    if shown.text:
        parts.append(f"<pre class='file-text'>{e(shown.text)}</pre>")
    return "<section class='file'>" + "".join(parts) + "</section>"


def metric_rows(r: RunRecord) -> list[list[str]]:
    rows = []
    for name, series in sorted(r.metrics.items()):
        if set(series) == {-1}:
            rows.append([name, f"{series[-1]:.6g}", ""])
        else:
            steps = sorted(series)
            rows.append([name, f"{series[steps[-1]]:.6g}", f"{len(steps)} steps ({steps[0]}..{steps[-1]})"])
    return rows


def run_page(r: RunRecord, files: Sequence[ShownFile], *, store: str, series_figure: str = "") -> str:
    models = [
        [m.source, m.fingerprint, m.weights_sha256 or "", m.model_type, "" if m.n_params is None else f"{m.n_params:,}"]
        for m in r.models
    ]
    body = [
        f"<h1>{e(r.name)} {_status(r.status)}</h1>",
        f"<p class='description'>{e(r.description)}</p>" if r.description else "",
        f"<p class='error'>{e(r.error)}</p>" if r.error else "",
        "<h2>Metrics</h2>",
        _table(["metric", "value", "series"], metric_rows(r), cls="metrics") if r.metrics else "<p>none</p>",
        _figure_div("fig-series", series_figure, title="metric series") if series_figure else "",
        "<h2>Config</h2>",
        f"<pre class='config'>{e(json.dumps(r.config, indent=2, sort_keys=True, ensure_ascii=False))}</pre>",
        "<h2>Provenance</h2>",
        _table(["field", "value"], _provenance_rows(r), cls="provenance"),
        "<h3>Models</h3>",
        _table(["source", "fingerprint", "weights sha256", "type", "parameters"], models) if models else "<p>none</p>",
        f"<h2>Files ({len(files)})</h2>",
        *(_file_block(r.id, i, f) for i, f in enumerate(files)),
    ]
    return page(f"{r.name} · mechscope run", "".join(body), store=store, figures=True)


# Compare -------------------------------------------------------------------------------------------------
def compare_page(
    comparison: Comparison,
    *,
    store: str,
    metrics_figure: str,
    overlays: Sequence[tuple[str, str]],
    side_by_side: Sequence[tuple[str, Sequence[tuple[str, str]]]],
) -> str:
    runs = comparison.runs
    header = ["metric", *(f"{r.name} ({r.id})" for r in runs)]
    metric_rows = [[name, *(e(v) for v in values)] for name, values in comparison.metrics]
    differs = [
        [e(name), *(e(_short(v)) for v in values)] for name, values in (*comparison.config, *comparison.provenance)
    ]
    links = " · ".join(f"<a href='{e(run_href(r.id))}'>{e(r.name)}</a> <code>{e(r.id)}</code>" for r in runs)
    body = [
        f"<h1>Comparing {len(runs)} runs</h1><p>{links}</p>",
        "<h2>Metrics</h2>",
        _table(header, metric_rows, cls="compare-metrics", raw=True) if metric_rows else "<p>no metrics</p>",
        _figure_div("fig-metrics", metrics_figure, title="metrics") if metrics_figure else "",
        "<h2>What differs</h2>",
        _table(["entry", *header[1:]], differs, cls="differs", raw=True)
        if differs
        else "<p>config and provenance agree</p>",
    ]
    for i, (title, fig) in enumerate(overlays):
        body.append(f"<h2>{e(title)} (overlaid)</h2>" + _figure_div(f"fig-overlay-{i}", fig, title=title))
    for i, (title, figs) in enumerate(side_by_side):
        cells = "".join(
            f"<div class='cell'><h4>{e(label)}</h4>{_figure_div(f'fig-side-{i}-{j}', fig, title=label)}</div>"
            for j, (label, fig) in enumerate(figs)
        )
        body.append(f"<h2>{e(title)} (side by side)</h2><div class='grid'>{cells}</div>")
    return page("compare · mechscope runs", "".join(body), store=store, figures=True)


def error_page(status: int, message: str, *, store: str) -> str:
    return page(f"{status} · mechscope runs", f"<h1>{e(status)}</h1><p class='error'>{e(message)}</p>", store=store)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def query_string(pairs: Sequence[tuple[str, str]]) -> str:
    return urlencode(list(pairs))


__all__ = ["compare_page", "e", "error_page", "list_page", "page", "run_page", "script_json"]
