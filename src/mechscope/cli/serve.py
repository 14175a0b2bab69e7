"""``mechscope serve``: the local run viewer (127.0.0.1 unless another host is named explicitly)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import fail


def serve(
    runs: Annotated[
        Path | None, typer.Option("--runs", help="Run store folder (default: $MECHSCOPE_RUNS or ./mechscope-runs).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8765,
    host: Annotated[
        str, typer.Option(help="Address to listen on. Anything but loopback exposes your runs to the network.")
    ] = "127.0.0.1",
) -> None:
    """Browse, filter and compare recorded runs in a local web page (read-only)."""
    from mechscope.errors import MechscopeError
    from mechscope.records import default_store_dir
    from mechscope.viewer import is_loopback, make_viewer_server

    store = runs if runs is not None else default_store_dir()
    if not is_loopback(host):
        typer.secho(
            f"warning: listening on {host}, not loopback: anyone who can reach this machine on port {port} can read "
            "every run in the store (it is read-only, but not private).",
            fg=typer.colors.YELLOW,
            err=True,
        )
    try:
        server, viewer = make_viewer_server(store, host=host, port=port)
    except MechscopeError as exc:
        raise fail(exc) from exc
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"serving {viewer.label} (read-only) at http://{shown}:{server.server_port}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()
        viewer.close()


__all__ = ["serve"]
