"""``mechscope locate heads | patterns``: head detectors and attention pattern views."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import Quiet, fail, offline_by_default, output_path, write_figure
from mechscope.cli.locate_lens import read_prompts


def register(app: typer.Typer) -> None:
    @app.command("heads")
    def heads_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        n_sequences: Annotated[int, typer.Option(help="Random repeated sequences.")] = 16,
        half_len: Annotated[int, typer.Option(help="Length of the repeated random half.")] = 20,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
        top: Annotated[int, typer.Option(help="Heads listed per detector.")] = 3,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Also write an HTML heatmap of induction scores.")] = None,
        quiet: Quiet = False,
    ) -> None:
        """Score every head as previous-token, duplicate-token, induction and copying head."""
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.heads import DETECTORS, HeadDetectorConfig, detect_heads
        from mechscope.model.loading import load_model

        try:
            hm = load_model(model)
            cfg = HeadDetectorConfig(n_sequences=n_sequences, half_len=half_len, seed=seed)
            scores = detect_heads(hm, config=cfg, progress=not quiet)
            path = scores.save(output_path(out, "heads.safetensors"))
            if html is not None:
                write_figure(scores.plot(), html)
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        for name in DETECTORS:
            best = ", ".join(f"L{layer}H{head} {score:.3f}" for layer, head, score in scores.top(name, top))
            typer.echo(f"{name:16s} {best}")
        typer.echo(f"result -> {path}")

    @app.command("patterns")
    def patterns_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text.")] = [],  # noqa: B006
        prompt_file: Annotated[Path | None, typer.Option(help="File whose first line is the prompt.")] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Interactive pattern view (HTML, head selector).")] = None,
    ) -> None:
        """Attention patterns of one prompt, every layer and head."""
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.heads import attention_patterns
        from mechscope.model.loading import load_model

        try:
            hm = load_model(model)
            result = attention_patterns(hm, read_prompts(prompt, prompt_file)[0])
            path = result.save(output_path(out, "patterns.safetensors"))
            if html is not None:
                write_figure(result.plot(), html)
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        typer.echo(f"patterns {tuple(result['pattern'].shape)} -> {path}" + (f", view -> {html}" if html else ""))
