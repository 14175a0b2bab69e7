"""``mechscope locate trace``: causal tracing (ROME) of one prompt and its subject."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import Quiet, fail
from mechscope.cli.verb import config_options, run_verb
from mechscope.locate.causal_tracing import TracingConfig


def register(app: typer.Typer) -> None:
    @app.command("trace")
    @config_options(TracingConfig)
    def trace_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        prompt: Annotated[str, typer.Option("--prompt", "-p", help="The factual prompt.")],
        subject: Annotated[str, typer.Option("--subject", "-s", help="Subject substring of the prompt to noise.")],
        target: Annotated[str | None, typer.Option(help="Answer token (default: the model's top token).")] = None,
        *,
        config: TracingConfig,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Also write an interactive HTML figure here.")] = None,
        edit_target: Annotated[
            str | None,
            typer.Option(
                help="Also measure what a ROME edit of this fact to this new answer costs at each layer the MLP "
                "peak points to (efficacy and neighbouring subjects turned into the target), and name the "
                "layer with the least collateral damage."
            ),
        ] = None,
        edit_margin: Annotated[int, typer.Option(help="Layers added on each side of the peak's range.")] = 1,
        stats_tokens: Annotated[int, typer.Option(help="Tokens of text for ROME's key statistics.")] = 20_000,
        quiet: Quiet = False,
    ) -> None:
        """Noise the subject, restore states per layer x position, report where the answer recovers.

        With ``--edit-target``, the MLP peak's range is turned into an editing recommendation: ROME at each
        candidate layer, measured on the same relation asked about other subjects, then reverted.
        """
        from mechscope.errors import MechscopeError
        from mechscope.locate.causal_tracing import causal_trace

        try:
            request = _edit_request(prompt, subject, edit_target) if edit_target is not None else None
        except MechscopeError as exc:
            raise fail(exc) from exc
        hm, result, path = run_verb(
            model,
            lambda hm: causal_trace(hm, prompt, subject, target, config, progress=not quiet),
            out=out,
            default_name="trace.safetensors",
            html=html,
            summary=_summary,
        )
        subject_last = max(result.config["subject_positions"])
        if request is not None:
            try:
                cost = _edit_cost(hm, result, request, edit_margin, stats_tokens, quiet)
                cost_path = cost.save(path.with_name(path.stem + "-edit-cost.safetensors"))
            except (MechscopeError, ValueError) as exc:
                raise fail(exc) from exc
            typer.echo(f"cost of a ROME edit to {edit_target!r} by layer ({cost.config['n_neighbours']} neighbours):")
            typer.echo(cost.table())
            best = cost.best()
            typer.echo(
                f"edit at layer {best}" if best is not None else "the edit did not succeed at any candidate layer"
            )
            typer.echo(f"edit cost -> {cost_path}")
        elif "mlp" in result.config["kinds"]:
            mlp_layer = result.peak_estimate("mlp", [subject_last]).layer
            typer.echo(
                f"before editing at layer {mlp_layer}: add `--edit-target ' NEW'` to measure the neighbourhood cost "
                "of a ROME edit at each layer of the range above"
            )


def _summary(result: Any, hm: Any) -> Iterator[str]:
    """Probabilities, the window, and per kind the peak, the peak at the subject's last token and its spread."""
    yield f"p(target) clean {float(result['clean']):.4f}  corrupted {float(result['corrupt']):.4f}"
    yield f"subject positions {result.config['subject_positions']}"
    yield f"window: {result.config['window']} layers (cut at the model's ends)"
    subject_last = max(result.config["subject_positions"])
    for kind in result.config["kinds"]:
        layer, pos, value = result.peak(kind)
        yield f"{kind:6s} peak: layer {layer}, position {result.labels['pos'][pos]}, effect {value:+.4f}"
        layer, _, value = result.peak(kind, [subject_last])
        yield f"{'':6s} at the subject's last token: layer {layer}, effect {value:+.4f}"
        est = result.peak_estimate(kind, [subject_last])
        span = est.layers[0] if len(est.layers) == 1 else f"{est.layers[0]}-{est.layers[-1]}"
        yield (
            f"{'':6s}   +- {est.stderr:.4f} over {est.n} noise draws; peak in {100 * est.frequency:.0f}% of "
            f"resamples; layers {span} within 2 s.e."
        )


def _edit_request(prompt: str, subject: str, target: str) -> Any:
    """The ROME request of ``--edit-target``: the traced prompt with its subject as the ``{}`` slot."""
    from mechscope.errors import ConfigError
    from mechscope.steer.editing.requests import EditRequest

    if prompt.count(subject) != 1:
        raise ConfigError(f"--edit-target needs the subject {subject!r} once in the prompt; got {prompt!r}")
    return EditRequest(prompt=prompt.replace(subject, "{}"), subject=subject, target=target)


def _edit_cost(hm: Any, trace: Any, request: Any, margin: int, stats_tokens: int, quiet: bool) -> Any:
    """ROME at each candidate layer of the trace's MLP peak, measured and reverted (improve.edit_layers)."""
    from mechscope.improve.edit_layers import candidate_layers, edit_cost_by_layer
    from mechscope.steer.editing.rome import ROMEConfig
    from mechscope.steer.editing.stats import StatsConfig

    layers = candidate_layers(trace, kind="mlp", margin=margin)
    config = ROMEConfig(stats=StatsConfig(n_tokens=stats_tokens))
    return edit_cost_by_layer(hm, request, layers, config=config, progress=not quiet)
