"""``mechscope diff BASE TUNED``: where a fine-tuned (or edited) model differs from its base."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import fail
from mechscope.cli.verb import config_options, run_verb
from mechscope.improve.diffing.diff import DiffConfig


@config_options(DiffConfig, exclude=("progress",))
def diff_command(
    base: Annotated[str, typer.Argument(help="Base model: folder or bundled name.")],
    tuned: Annotated[str, typer.Argument(help="Tuned model: folder or bundled name ('-' with --edit).")] = "-",
    edit: Annotated[Path | None, typer.Option(help="A saved edit record to apply to a copy of BASE instead.")] = None,
    text: Annotated[
        list[str], typer.Option("--text", "-t", help="Text to compare on (repeatable; default: neutral text).")
    ] = [],  # noqa: B006
    texts_file: Annotated[Path | None, typer.Option(help="A file of texts, one per line.")] = None,
    *,
    config: DiffConfig,
    top: Annotated[int, typer.Option(help="Components to print per view.")] = 8,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Result .safetensors file (default: ./mechscope-out).")
    ] = None,
    figure: Annotated[Path | None, typer.Option(help="Also write the figure as a self-contained HTML file.")] = None,
) -> None:
    """Diff two models of one architecture: weights, activations, logit lens of the difference, cross-model
    patching and KL by position. Prints the top components of each view."""
    from mechscope.cli.common import load_model
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.improve.diffing import diff_models
    from mechscope.improve.neutral import NEUTRAL_TEXTS

    try:
        if (tuned == "-") == (edit is None):
            raise ConfigError("give either TUNED (a model) or --edit (an edit record applied to BASE), not both")
        texts = list(text)
        if texts_file is not None:
            if not texts_file.is_file():
                raise ConfigError(f"--texts-file {texts_file} does not exist")
            texts += [line for line in texts_file.read_text().splitlines() if line.strip()]
    except MechscopeError as exc:
        raise fail(exc) from exc

    def call(base_model: Any) -> Any:
        if edit is not None:
            from mechscope.steer.editing import EditRecord

            other: object = EditRecord.load(edit)
        else:
            other = load_model(tuned)
        return diff_models(base_model, other, texts or NEUTRAL_TEXTS, config=replace(config, progress=True))

    def summary(result: Any, hm: Any) -> list[str]:
        last = result.lens(-1)
        return [
            f"base {base} vs {'edit ' + str(edit) if edit is not None else 'tuned ' + tuned}",
            result.summary(top),
            "lens of the difference, last layer: " + ", ".join(f"{t!r} {s:+.3g}" for t, s in last[:top]),
        ]

    run_verb(base, call, out=out, default_name="diff.safetensors", html=figure, summary=summary)


__all__ = ["diff_command"]
