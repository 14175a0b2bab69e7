"""``mechscope diff BASE TUNED``: where a fine-tuned (or edited) model differs from its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import fail, offline_by_default, output_path, write_figure


def diff_command(
    base: Annotated[str, typer.Argument(help="Base model: folder or bundled name.")],
    tuned: Annotated[str, typer.Argument(help="Tuned model: folder or bundled name ('-' with --edit).")] = "-",
    edit: Annotated[Path | None, typer.Option(help="A saved edit record to apply to a copy of BASE instead.")] = None,
    text: Annotated[
        list[str], typer.Option("--text", "-t", help="Text to compare on (repeatable; default: neutral text).")
    ] = [],  # noqa: B006
    texts_file: Annotated[Path | None, typer.Option(help="A file of texts, one per line.")] = None,
    k: Annotated[int, typer.Option(help="Tokens per layer in the lens of the difference.")] = 10,
    causal: Annotated[bool, typer.Option("--causal/--no-causal", help="Run cross-model patching.")] = True,
    lens_read: Annotated[
        str, typer.Option(help="Lens of the difference over every real token ('all') or each text's last ('last').")
    ] = "all",
    top: Annotated[int, typer.Option(help="Components to print per view.")] = 8,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Result .safetensors file (default: ./mechscope-out).")
    ] = None,
    figure: Annotated[Path | None, typer.Option(help="Also write the figure as a self-contained HTML file.")] = None,
) -> None:
    """Diff two models of one architecture: weights, activations, logit lens of the difference, cross-model
    patching and KL by position. Prints the top components of each view."""
    offline_by_default()
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.improve.diffing import DiffConfig, diff_models
    from mechscope.improve.neutral import NEUTRAL_TEXTS
    from mechscope.model.loading import load_model

    try:
        if (tuned == "-") == (edit is None):
            raise ConfigError("give either TUNED (a model) or --edit (an edit record applied to BASE), not both")
        texts = list(text)
        if texts_file is not None:
            if not texts_file.is_file():
                raise ConfigError(f"--texts-file {texts_file} does not exist")
            texts += [line for line in texts_file.read_text().splitlines() if line.strip()]
        base_model = load_model(base)
        if edit is not None:
            from mechscope.steer.editing import EditRecord

            other: object = EditRecord.load(edit)
        else:
            other = load_model(tuned)
        config = DiffConfig(k=k, causal=causal, lens_read=lens_read, progress=True)
        result = diff_models(base_model, other, texts or NEUTRAL_TEXTS, config=config)
        path = result.save(output_path(out, "diff.safetensors"))
        if figure is not None:
            write_figure(result.plot(), figure)
    except MechscopeError as exc:
        raise fail(exc) from exc
    typer.echo(f"base {base} vs {'edit ' + str(edit) if edit is not None else 'tuned ' + tuned}")
    typer.echo(result.summary(top))
    last = result.lens(-1)
    typer.echo("lens of the difference, last layer: " + ", ".join(f"{t!r} {s:+.3g}" for t, s in last[:top]))
    typer.echo(f"result -> {path}" + (f", figure -> {figure}" if figure is not None else ""))


__all__ = ["diff_command"]
