"""What every `mechscope` command shares: offline-by-default environment, one way to load a model (with the
command line's ``--dtype`` and ``--device``), one way to fail, one output folder for results nobody named,
renamed options with a deprecation note, and figures sharing plotly.js."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: Where results go when a command is not given an output path (``$MECHSCOPE_OUT`` overrides).
DEFAULT_OUT_DIR = "mechscope-out"


def offline_by_default() -> None:
    """mechscope never downloads unless asked: keep HF libraries from trying (they hang when offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: the ``--dtype`` / ``--device`` given to the `mechscope` command (set by its callback for each invocation)
_LOAD_OPTIONS: dict[str, str] = {}


def set_load_options(*, dtype: str | None, device: str | None) -> None:
    """Remember the command line's ``--dtype`` and ``--device`` for every model this invocation loads."""
    _LOAD_OPTIONS.clear()
    _LOAD_OPTIONS.update({key: value for key, value in (("dtype", dtype), ("device", device)) if value})


def load_options() -> dict[str, str]:
    """The command line's ``--dtype`` / ``--device`` that were given (empty when neither was)."""
    return dict(_LOAD_OPTIONS)


def load_model(source: str | os.PathLike[str], **kwargs: Any) -> HookedModel:
    """:func:`mechscope.load_model` with the command line's ``--dtype`` and ``--device`` (the way every
    command loads the models it is given, so a bf16 or GPU run needs no option on each command)."""
    from mechscope.model.loading import load_model as load

    return load(source, **{**_LOAD_OPTIONS, **kwargs})


def fail(exc: Exception) -> typer.Exit:
    """Print `exc` as a red error line on stderr; the returned Exit (code 2) is for ``raise ... from exc``."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


#: ``--quiet/-q``: no progress bars (long jobs show one on stderr by default).
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def out_dir() -> Path:
    """The folder for unnamed outputs: ``$MECHSCOPE_OUT`` or ``./mechscope-out``."""
    return Path(os.environ.get("MECHSCOPE_OUT") or DEFAULT_OUT_DIR)


def output_path(out: Path | None, default_name: str) -> Path:
    """`out` when the user named it; else `default_name` in :func:`out_dir`, never replacing an existing file
    (``name.safetensors`` -> ``name-1.safetensors`` -> ...). Results never land in the current folder unasked."""
    if out is not None:
        return out
    folder = out_dir()
    folder.mkdir(parents=True, exist_ok=True)
    candidate = folder / default_name
    stem, suffix = Path(default_name).stem, Path(default_name).suffix
    n = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{n}{suffix}"
        n += 1
    return candidate


def renamed(new_value: Any, old_value: Any, *, new: str, old: str) -> Any:
    """The value of option `new`, or of its deprecated spelling `old` (with a note on stderr); both is an error."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise typer.BadParameter(f"give {new} (or the deprecated {old}), not both")
    typer.secho(f"note: {old} is deprecated; use {new}", fg=typer.colors.YELLOW, err=True)
    return old_value


def write_figure(fig: Any, path: Path) -> Path:
    """Write a plotly figure as HTML that loads ``plotly.min.js`` from its own folder (written once there),
    instead of embedding the 4.8 MB library in every file. ``MECHSCOPE_FIGURE_JS=inline`` embeds it."""
    from mechscope.report.html import write_figure as write

    return write(fig, path, plotlyjs="inline" if os.environ.get("MECHSCOPE_FIGURE_JS") == "inline" else "shared")
