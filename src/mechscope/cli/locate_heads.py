"""``mechscope locate heads | patterns``: head detectors and attention pattern views."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import Quiet
from mechscope.cli.locate_lens import read_prompts
from mechscope.cli.verb import config_options, run_verb
from mechscope.locate.heads import HeadDetectorConfig


def register(app: typer.Typer) -> None:
    @app.command("heads")
    @config_options(HeadDetectorConfig)
    def heads_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        config: HeadDetectorConfig,
        top: Annotated[int, typer.Option(help="Heads listed per detector.")] = 3,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Also write an HTML heatmap of induction scores.")] = None,
        quiet: Quiet = False,
    ) -> None:
        """Score every head as previous-token, duplicate-token, induction and copying head."""
        from mechscope.locate.heads import DETECTORS, detect_heads

        def summary(scores: Any, hm: Any) -> Iterator[str]:
            for name in DETECTORS:
                best = ", ".join(f"L{layer}H{head} {score:.3f}" for layer, head, score in scores.top(name, top))
                yield f"{name:16s} {best}"

        run_verb(
            model,
            lambda hm: detect_heads(hm, config=config, progress=not quiet),
            out=out,
            default_name="heads.safetensors",
            html=html,
            summary=summary,
        )

    @app.command("patterns")
    def patterns_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text.")] = [],  # noqa: B006
        prompt_file: Annotated[Path | None, typer.Option(help="File whose first line is the prompt.")] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Interactive pattern view (HTML, head selector).")] = None,
    ) -> None:
        """Attention patterns of one prompt, every layer and head."""
        from mechscope.locate.heads import attention_patterns

        run_verb(
            model,
            lambda hm: attention_patterns(hm, read_prompts(prompt, prompt_file)[0]),
            out=out,
            default_name="patterns.safetensors",
            html=html,
            summary=lambda result, hm: [f"patterns {tuple(result['pattern'].shape)}"],
        )
