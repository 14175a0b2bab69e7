"""``mechscope locate <method>``: every localisation method as a subcommand.

Each family of methods keeps its commands in its own module (``cli/locate_<area>.py``) exposing
``register(app)``; this module only gathers them, so the groups can grow independently.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec

import typer

locate_app = typer.Typer(help="Locate where a behaviour lives.", no_args_is_help=True)

_AREAS = ("lens", "probes", "heads", "attribution", "patching", "tracing", "circuits")

for _area in _AREAS:
    _module = f"mechscope.cli.locate_{_area}"
    if find_spec(_module) is not None:
        import_module(_module).register(locate_app)
