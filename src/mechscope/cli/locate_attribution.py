"""``mechscope locate dla | ig``: direct logit attribution and integrated gradients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import Quiet, renamed
from mechscope.cli.locate_lens import read_prompts
from mechscope.cli.verb import config_options, run_verb
from mechscope.locate.attribution import IGConfig


def register(app: typer.Typer) -> None:
    @app.command("dla")
    def dla_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        answer: Annotated[str | None, typer.Option(help="Answer token (a single-token string, e.g. ' Paris').")] = None,
        wrong: Annotated[str | None, typer.Option(help="Wrong-answer token subtracted (logit difference).")] = None,
        target: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --answer.")] = None,
        baseline: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --wrong.")] = None,
        prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeatable).")] = [],  # noqa: B006
        prompt_file: Annotated[Path | None, typer.Option(help="File with one prompt per line.")] = None,
        by: Annotated[str, typer.Option(help="layer, head, neuron or position.")] = "head",
        top: Annotated[int, typer.Option(help="Components listed.")] = 10,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Also write an HTML figure.")] = None,
    ) -> None:
        """Direct logit attribution of the answer (minus wrong) logit at each prompt's last token."""
        from mechscope.locate.attribution import logit_attribution
        from mechscope.locate.metrics import last_positions

        answer = renamed(answer, target, new="--answer", old="--target")
        wrong = renamed(wrong, baseline, new="--wrong", old="--baseline")
        if answer is None:
            raise typer.BadParameter("give --answer TOKEN (e.g. ' Paris')")
        chosen: str = answer

        def call(hm: Any) -> Any:
            batch = hm.prepare_inputs(read_prompts(prompt, prompt_file))
            position = last_positions(batch["attention_mask"])
            return logit_attribution(hm, batch, chosen, baseline=wrong, position=position, by=by)  # type: ignore[arg-type]

        def summary(result: Any, hm: Any) -> Iterator[str]:
            yield f"logit{' difference' if wrong else ''}: {result['logit'].mean():.4f} (mean over prompts)"
            for name, value in result.top(top):
                yield f"{name:20s} {value:+9.4f}"

        run_verb(model, call, out=out, default_name="dla.safetensors", html=html, summary=summary)

    @app.command("ig")
    @config_options(IGConfig)
    def ig_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        answer: Annotated[str | None, typer.Option(help="Answer token (single-token string).")] = None,
        wrong: Annotated[str | None, typer.Option(help="Wrong-answer token subtracted (logit difference).")] = None,
        target: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --answer.")] = None,
        baseline_token: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --wrong.")] = None,
        prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (one prompt).")] = [],  # noqa: B006
        prompt_file: Annotated[Path | None, typer.Option(help="File whose first line is the prompt.")] = None,
        site: Annotated[
            str, typer.Option(help="Site to attribute to (hook_embed: input IG; else layer IG).")
        ] = "hook_embed",
        *,
        config: IGConfig,
        baseline: Annotated[
            str,
            typer.Option(
                help="Path start: mean (each prompt's mean over its tokens), pad (the site on pad tokens) or zero "
                "(refused where it zeroes the whole residual stream: hook_embed of rotary models, resid sites)."
            ),
        ] = "mean",
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        quiet: Quiet = False,
    ) -> None:
        """Integrated gradients of the target logit (difference) at the last token, with completeness check."""
        from mechscope.locate.attribution import IG_BASELINES, integrated_gradients, logit_metric

        answer = renamed(answer, target, new="--answer", old="--target")
        wrong = renamed(wrong, baseline_token, new="--wrong", old="--baseline-token")
        if answer is None:
            raise typer.BadParameter("give --answer TOKEN (e.g. ' Paris')")
        if baseline not in IG_BASELINES:
            raise typer.BadParameter(f"--baseline must be one of {', '.join(IG_BASELINES)}; got {baseline!r}")
        chosen: str = answer
        text: list[str] = []

        def call(hm: Any) -> Any:
            text.append(read_prompts(prompt, prompt_file)[0])
            metric = logit_metric(hm.to_single_token(chosen), hm.to_single_token(wrong) if wrong else None)
            return integrated_gradients(
                hm,
                text[0],
                metric,
                site=site,
                baseline=baseline,  # type: ignore[arg-type]
                config=config,
                progress=not quiet,
            )

        def summary(result: Any, hm: Any) -> Iterator[str]:
            attribution = result["attribution"][0]
            if attribution.ndim == 1:
                for tok, value in zip(hm.to_str_tokens(text[0]), attribution.tolist(), strict=True):
                    yield f"{tok!r:16s} {value:+9.4f}"
            yield (
                f"f(x) - f(baseline) = {float(result['delta'][0]):.4f} ({baseline} baseline); sum of attributions - "
                f"that = {float(result['error'][0]):.2e} ({config.rule}, {config.steps} steps)"
            )

        run_verb(model, call, out=out, default_name="ig.safetensors", summary=summary)
