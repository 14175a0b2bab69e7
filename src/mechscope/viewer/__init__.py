"""A local web viewer of run records: list and filter runs, open one, compare several side by side.

    mechscope serve --runs mechscope-runs          # http://127.0.0.1:8765/

Bound to 127.0.0.1 unless another host is asked for explicitly; the store is opened read-only; every
string from a run is HTML-escaped; files are read only inside the store and only as safetensors/JSON/text.
"""

from __future__ import annotations

from mechscope.viewer.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    PortInUse,
    Viewer,
    is_loopback,
    make_viewer_server,
    serve_in_thread,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "PortInUse",
    "Viewer",
    "is_loopback",
    "make_viewer_server",
    "serve_in_thread",
]
