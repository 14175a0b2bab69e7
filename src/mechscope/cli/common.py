"""What every `mechscope` command shares: offline-by-default environment and one way to fail."""

from __future__ import annotations

import os

import typer


def offline_by_default() -> None:
    """mechscope never downloads unless asked: keep HF libraries from trying (they hang when offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fail(exc: Exception) -> typer.Exit:
    """Print `exc` as a red error line on stderr; the returned Exit (code 2) is for ``raise ... from exc``."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)
