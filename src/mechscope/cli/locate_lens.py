"""``mechscope locate logit-lens | tuned-lens-train | tuned-lens``: vocabulary projections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import fail, offline_by_default


def read_prompts(prompts: list[str], prompt_file: Path | None) -> list[str]:
    """Prompts from repeated --prompt options and/or a file with one prompt per line."""
    out = list(prompts)
    if prompt_file is not None:
        out += [line for line in prompt_file.read_text().splitlines() if line.strip()]
    if not out:
        raise typer.BadParameter("give at least one --prompt or a --prompt-file")
    return out


Model = Annotated[str, typer.Argument(help="Model folder or bundled model name.")]
Prompts = Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeatable).")]
PromptFile = Annotated[Path | None, typer.Option(help="File with one prompt per line.")]
Html = Annotated[Path | None, typer.Option(help="Also write an interactive HTML figure here.")]


def register(app: typer.Typer) -> None:
    @app.command("logit-lens")
    def logit_lens_cmd(
        model: Model,
        prompt: Prompts = [],  # noqa: B006
        prompt_file: PromptFile = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Result file.")] = Path("logit_lens.safetensors"),
        html: Html = None,
    ) -> None:
        """Logit lens: per-layer KL to the final distribution and top tokens."""
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.lens import logit_lens
        from mechscope.model.loading import load_model

        try:
            hm = load_model(model)
            result = logit_lens(hm, read_prompts(prompt, prompt_file))
            result.save(out)
            if html is not None:
                result.plot().write_html(str(html))
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        kl = result["kl"].mean((1, 2))
        for label, value in zip(result.labels["layer"], kl.tolist()):
            typer.echo(f"{label:14s} KL {value:8.4f}")
        typer.echo(f"result -> {out}")

    @app.command("tuned-lens-train")
    def tuned_lens_train_cmd(
        model: Model,
        out: Annotated[Path, typer.Option("--out", "-o", help="Lens file.")] = Path("tuned_lens.safetensors"),
        text_file: Annotated[
            Path | None, typer.Option(help="Training text, one document per line (default: zoo task text).")
        ] = None,
        steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 300,
        lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
        batch_tokens: Annotated[int, typer.Option(help="Token positions per step.")] = 512,
        seq_len: Annotated[int, typer.Option(help="Window length.")] = 64,
        max_windows: Annotated[int, typer.Option(help="Windows cached for training.")] = 64,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    ) -> None:
        """Train a tuned lens on a text stream, save it and print held-out KL of both lenses."""
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.tuned_lens import (
            TunedLensConfig,
            compare_lenses,
            token_windows,
            train_tuned_lens,
            zoo_texts,
        )
        from mechscope.model.loading import load_model

        try:
            hm = load_model(model)
            cfg = TunedLensConfig(
                steps=steps, lr=lr, batch_tokens=batch_tokens, seq_len=seq_len, max_windows=max_windows, seed=seed
            )
            if text_file is not None:
                texts = [line for line in text_file.read_text().splitlines() if line.strip()]
                train, held = texts[: int(len(texts) * 0.9)], texts[int(len(texts) * 0.9) :]
            else:
                train, held = zoo_texts(seed), zoo_texts(seed, split="eval")
            lens = train_tuned_lens(hm, train, config=cfg, progress=True)
            lens.save(out)
            comparison = compare_lenses(hm, token_windows(hm, held, seq_len=seq_len, max_windows=16), lens)
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        typer.echo("layer           logit-lens KL  tuned-lens KL  (held-out text)")
        for label, a, b in zip(
            comparison.labels["layer"], comparison["logit_lens_kl"].tolist(), comparison["tuned_lens_kl"].tolist()
        ):
            typer.echo(f"{label:14s} {a:14.4f} {b:14.4f}")
        typer.echo(f"lens -> {out}")

    @app.command("tuned-lens")
    def tuned_lens_cmd(
        model: Model,
        lens: Annotated[Path, typer.Option(help="Lens file from `tuned-lens-train`.")],
        prompt: Prompts = [],  # noqa: B006
        prompt_file: PromptFile = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Result file.")] = Path("tuned_lens.safetensors"),
        html: Html = None,
    ) -> None:
        """Read prompts through a trained tuned lens (per-layer KL and top tokens)."""
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.tuned_lens import TunedLens, tuned_lens
        from mechscope.model.loading import load_model

        try:
            hm = load_model(model)
            result = tuned_lens(hm, read_prompts(prompt, prompt_file), TunedLens.load(lens))
            result.save(out)
            if html is not None:
                result.plot().write_html(str(html))
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        for label, value in zip(result.labels["layer"], result["kl"].mean((1, 2)).tolist()):
            typer.echo(f"{label:14s} KL {value:8.4f}")
        typer.echo(f"result -> {out}")
