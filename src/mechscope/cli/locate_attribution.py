"""``mechscope locate dla | ig``: direct logit attribution and integrated gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import Quiet, fail, offline_by_default, output_path, renamed, write_figure
from mechscope.cli.locate_lens import read_prompts


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
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.attribution import logit_attribution
        from mechscope.locate.metrics import last_positions
        from mechscope.model.loading import load_model

        try:
            answer = renamed(answer, target, new="--answer", old="--target")
            wrong = renamed(wrong, baseline, new="--wrong", old="--baseline")
            if answer is None:
                raise typer.BadParameter("give --answer TOKEN (e.g. ' Paris')")
            hm = load_model(model)
            batch = hm.prepare_inputs(read_prompts(prompt, prompt_file))
            result = logit_attribution(
                hm,
                batch,
                answer,
                baseline=wrong,
                position=last_positions(batch["attention_mask"]),
                by=by,  # type: ignore[arg-type]
            )
            path = result.save(output_path(out, "dla.safetensors"))
            if html is not None:
                write_figure(result.plot(), html)
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        typer.echo(f"logit{' difference' if wrong else ''}: {result['logit'].mean():.4f} (mean over prompts)")
        for name, value in result.top(top):
            typer.echo(f"{name:20s} {value:+9.4f}")
        typer.echo(f"result -> {path}")

    @app.command("ig")
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
        steps: Annotated[int, typer.Option(help="Integration steps (gradient evaluations per prompt).")] = 64,
        baseline: Annotated[
            str,
            typer.Option(
                help="Path start: mean (each prompt's mean over its tokens), pad (the site on pad tokens) or zero "
                "(refused where it zeroes the whole residual stream: hook_embed of rotary models, resid sites)."
            ),
        ] = "mean",
        rule: Annotated[str, typer.Option(help="adaptive, gauss_legendre, midpoint or trapezoid.")] = "adaptive",
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        quiet: Quiet = False,
    ) -> None:
        """Integrated gradients of the target logit (difference) at the last token, with completeness check."""
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.attribution import IG_BASELINES, IGConfig, integrated_gradients, logit_metric
        from mechscope.model.loading import load_model

        try:
            answer = renamed(answer, target, new="--answer", old="--target")
            wrong = renamed(wrong, baseline_token, new="--wrong", old="--baseline-token")
            if answer is None:
                raise typer.BadParameter("give --answer TOKEN (e.g. ' Paris')")
            hm = load_model(model)
            text = read_prompts(prompt, prompt_file)[0]
            good = hm.to_single_token(answer)
            bad = hm.to_single_token(wrong) if wrong else None
            if baseline not in IG_BASELINES:
                raise typer.BadParameter(f"--baseline must be one of {', '.join(IG_BASELINES)}; got {baseline!r}")
            result = integrated_gradients(
                hm,
                text,
                logit_metric(good, bad),
                site=site,
                baseline=baseline,  # type: ignore[arg-type]
                config=IGConfig(steps=steps, rule=rule),  # type: ignore[arg-type]
                progress=not quiet,
            )
            path = result.save(output_path(out, "ig.safetensors"))
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        tokens = hm.to_str_tokens(text)
        attribution = result["attribution"][0]
        if attribution.ndim == 1:
            for tok, value in zip(tokens, attribution.tolist()):
                typer.echo(f"{tok!r:16s} {value:+9.4f}")
        typer.echo(
            f"f(x) - f(baseline) = {float(result['delta'][0]):.4f} ({baseline} baseline); sum of attributions - "
            f"that = {float(result['error'][0]):.2e} ({rule}, {steps} steps)"
        )
        typer.echo(f"result -> {path}")
