"""The viewer's web app (bottle) and a threaded loopback server.

Routes: ``/`` (run list with filters), ``/runs/<id>`` (one run), ``/compare?id=A&id=B`` (side by side),
``/runs/<id>/files/<name>`` (a file of a run, resolved inside the store), ``/static/...`` (CSS, JS and
plotly.min.js from the plotly package). The store is opened read-only; only GET and HEAD are answered.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle

from mechscope.errors import ConfigError, MechscopeError
from mechscope.records import PathRefused, RunRecord, RunStore, StoreError, compare
from mechscope.viewer import pages
from mechscope.viewer.assets import CSS, JS, plotly_js_path
from mechscope.viewer.figures import FileViews, ShownFile, import_result_classes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
_MAX_COMPARE = 8
#: The run list shows at most this many runs (the newest that match); filters narrow it.
_LIST_LIMIT = 500
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class PortInUse(MechscopeError):
    """The chosen port is taken."""


class Viewer:
    """The app over one store: ``Viewer(dir).app`` is a WSGI application."""

    def __init__(self, store_dir: str | Path) -> None:
        self.store = RunStore(store_dir, read_only=True)
        self.label = str(self.store.root)
        self.views = FileViews(self.store)
        self._plotly = plotly_js_path().read_bytes()
        self.allowed_hosts: set[str] | None = None  # None: any Host (a non-loopback address was asked for)
        self.app = bottle.Bottle()
        self.app.config["autojson"] = False
        self._routes()

    def close(self) -> None:
        self.store.close()

    # Routes ------------------------------------------------------------------------------------------
    def _routes(self) -> None:
        app = self.app
        app.route("/", ["GET", "HEAD"], self.list_runs)
        app.route("/runs/<run_id>", ["GET", "HEAD"], self.show_run)
        app.route("/runs/<run_id>/files/<name>", ["GET", "HEAD"], self.run_file)
        app.route("/compare", ["GET", "HEAD"], self.compare_runs)
        app.route("/static/<name>", ["GET", "HEAD"], self.static)
        app.add_hook("before_request", self._check_host)
        app.add_hook("after_request", _secure)
        for status in (400, 403, 404, 405, 500):
            app.error(status)(self._error)

    def _check_host(self) -> None:
        """On loopback, answer only requests addressed to loopback names: a web page whose domain was
        rebound to 127.0.0.1 (DNS rebinding) sends its own Host header and is refused."""
        if self.allowed_hosts is None:
            return
        host = bottle.request.get_header("Host", "").lower()
        if host not in self.allowed_hosts:
            raise bottle.HTTPError(403, f"unexpected Host header {host!r}; open the viewer at http://127.0.0.1")

    def allow_loopback_hosts(self, port: int) -> None:
        """Accept only ``127.0.0.1:port``, ``localhost:port`` and ``[::1]:port`` as Host."""
        self.allowed_hosts = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}

    def _error(self, err: bottle.HTTPError) -> str:
        _secure()
        bottle.response.content_type = "text/html; charset=utf-8"
        return pages.error_page(err.status_code, str(err.body or err.status_line), store=self.label)

    def _html(self, text: str) -> str:
        bottle.response.content_type = "text/html; charset=utf-8"
        return text

    def list_runs(self) -> str:
        query = bottle.request.query.decode()
        filters = {k: str(query.get(k, "")).strip()[:200] for k in ("q", "tag", "method", "status")}
        chosen = {"text": filters["q"], "tag": filters["tag"], "method": filters["method"], "status": filters["status"]}
        runs = self.store.runs(**chosen, limit=_LIST_LIMIT)
        return self._html(
            pages.list_page(
                runs,
                store=self.label,
                filters=filters,
                tags=self.store.tags(),
                methods=self.store.methods(),
                total=self.store.count(),
                matched=self.store.count(**chosen),
            )
        )

    def _get(self, run_id: str) -> RunRecord:
        try:
            return self.store.get(run_id)
        except StoreError as exc:
            raise bottle.HTTPError(404, str(exc)) from exc

    def show_run(self, run_id: str) -> str:
        record = self._get(run_id)
        chosen = dict(v.split(":", 1) for v in bottle.request.query.decode().getall("tensor") if ":" in v)
        files = [self.views.show(a, chosen.get(a.name, "")[:200]) for a in record.artifacts]
        return self._html(pages.run_page(record, files, store=self.label, series_figure=_series_figure(record)))

    def run_file(self, run_id: str, name: str) -> Any:
        record = self._get(run_id)
        matches = [a for a in record.artifacts if a.name == name]
        if not matches:
            raise bottle.HTTPError(404, f"run {run_id} has no file named {name!r}")
        art = matches[0]
        try:
            path = self.store.artifact_path(art)
        except PathRefused as exc:
            raise bottle.HTTPError(403, str(exc)) from exc
        if not path.is_file():
            raise bottle.HTTPError(404, f"missing file {art.relative_path} of run {run_id} (not in the store)")
        root = str(path.parent)
        download = f"{name}.{art.ext}" if not name.endswith(f".{art.ext}") else name
        return bottle.static_file(path.name, root=root, download=download, mimetype="application/octet-stream")

    def compare_runs(self) -> str:
        ids = [i.strip() for i in bottle.request.query.decode().getall("id") if i.strip()]
        ids = list(dict.fromkeys(ids))
        if len(ids) < 2:
            raise bottle.HTTPError(400, f"compare two or more runs: choose them on the run list (got {len(ids)})")
        if len(ids) > _MAX_COMPARE:
            raise bottle.HTTPError(400, f"compare at most {_MAX_COMPARE} runs at once; got {len(ids)}")
        for run_id in ids:
            self._get(run_id)
        comparison = compare(self.store, ids)
        shown = {r.id: [self.views.show(a) for a in r.artifacts] for r in comparison.runs}
        overlays, side = _figures_by_name(comparison.runs, shown)
        return self._html(
            pages.compare_page(
                comparison,
                store=self.label,
                metrics_figure=_metrics_figure(comparison),
                overlays=overlays,
                side_by_side=side,
            )
        )

    def static(self, name: str) -> Any:
        if name == "viewer.css":
            bottle.response.content_type = "text/css; charset=utf-8"
            return CSS
        if name == "viewer.js":
            bottle.response.content_type = "text/javascript; charset=utf-8"
            return JS
        if name == "plotly.min.js":
            bottle.response.content_type = "text/javascript; charset=utf-8"
            bottle.response.set_header("Cache-Control", "max-age=86400")
            return self._plotly
        raise bottle.HTTPError(404, f"no static file {name!r}")


def _secure() -> None:
    for key, value in _SECURITY_HEADERS.items():
        bottle.response.set_header(key, value)


# Figures built from several runs -------------------------------------------------------------------------
def _series_figure(record: RunRecord) -> str:
    import plotly.graph_objects as go

    series = {k: v for k, v in record.metrics.items() if set(v) != {-1}}
    if not series:
        return ""
    fig = go.Figure()
    for name, values in sorted(series.items()):
        steps = sorted(s for s in values if s >= 0)
        fig.add_trace(go.Scatter(x=steps, y=[values[s] for s in steps], mode="lines+markers", name=name))
    fig.update_layout(title="metric series", xaxis_title="step", height=360)
    return str(fig.to_json())


def _metrics_figure(comparison: Any) -> str:
    import plotly.graph_objects as go

    rows = [(name, values) for name, values in comparison.metrics if sum(v is not None for v in values) >= 2]
    if not rows:
        return ""
    fig = go.Figure()
    for i, run in enumerate(comparison.runs):
        fig.add_trace(go.Bar(name=f"{run.name} ({run.id})", x=[n for n, _ in rows], y=[v[i] for _, v in rows]))
    fig.update_layout(barmode="group", title="metrics (each run's last value)", height=420)
    return str(fig.to_json())


_OVERLAYABLE = {"bar", "scatter"}


def _figures_by_name(
    runs: Sequence[RunRecord], shown: dict[str, list[ShownFile]]
) -> tuple[list[tuple[str, str]], list[tuple[str, list[tuple[str, str]]]]]:
    """Results with the same name in several runs: bar/line figures overlaid (one trace group per run),
    others (heatmaps) side by side."""
    names: dict[str, list[tuple[RunRecord, ShownFile]]] = {}
    for run in runs:
        for f in shown[run.id]:
            if f.figure:
                names.setdefault(f.name, []).append((run, f))
    overlays: list[tuple[str, str]] = []
    side: list[tuple[str, list[tuple[str, str]]]] = []
    for name, items in names.items():
        if len(items) < 2:
            continue
        figs = [json.loads(f.figure) for _, f in items]
        if all(t.get("type") in _OVERLAYABLE for fig in figs for t in fig.get("data", [])):
            data = []
            for (run, _), fig in zip(items, figs):
                for trace in fig.get("data", []):
                    label = f"{run.name} ({run.id})"
                    trace["name"] = f"{label}: {trace['name']}" if trace.get("name") else label
                    trace["legendgroup"] = run.id
                    data.append(trace)
            layout = figs[0].get("layout", {})
            layout["barmode"] = "group"
            layout["showlegend"] = True
            overlays.append((name, json.dumps({"data": data, "layout": layout})))
        else:
            side.append((name, [(f"{run.name} ({run.id})", f.figure) for run, f in items]))
    return overlays, side


# Serving ------------------------------------------------------------------------------------------------
class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_viewer_server(
    store_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> tuple[Any, Viewer]:
    """(server, viewer) bound to host:port; port 0 picks a free one (see ``server.server_port``).

    Raises :class:`PortInUse` naming the port when it is taken.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int in 0..65535; got {port!r}")
    viewer = Viewer(store_dir)
    try:
        server = make_server(host, port, viewer.app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except OSError as exc:
        viewer.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use (another `mechscope serve`?); choose another with --port"
            ) from exc
        if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL,):
            raise ConfigError(f"cannot listen on {host!r}: {exc}") from exc
        raise
    if is_loopback(host):
        viewer.allow_loopback_hosts(server.server_port)
    # importing the result classes takes seconds (torch, transformers): do it now, not on the first run page
    threading.Thread(target=import_result_classes, name="mechscope-viewer-imports", daemon=True).start()
    return server, viewer


def serve_in_thread(store_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = 0) -> tuple[Any, threading.Thread]:
    """Start a viewer in a daemon thread (tests, notebooks); stop it with ``server.shutdown()``."""
    server, viewer = make_viewer_server(store_dir, host=host, port=port)
    thread = threading.Thread(target=server.serve_forever, name="mechscope-viewer", daemon=True)
    thread.start()
    server.viewer = viewer
    return server, thread


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "PortInUse",
    "Viewer",
    "is_loopback",
    "make_viewer_server",
    "serve_in_thread",
]
