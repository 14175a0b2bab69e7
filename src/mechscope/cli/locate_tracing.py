"""``mechscope locate trace``: causal tracing (ROME) of one prompt and its subject."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import Quiet, fail, offline_by_default, output_path, write_figure


def register(app: typer.Typer) -> None:
    @app.command("trace")
    def trace_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        prompt: Annotated[str, typer.Option("--prompt", "-p", help="The factual prompt.")],
        subject: Annotated[str, typer.Option("--subject", "-s", help="Subject substring of the prompt to noise.")],
        target: Annotated[str | None, typer.Option(help="Answer token (default: the model's top token).")] = None,
        noise: Annotated[float, typer.Option(help="Noise std as a multiple of the embedding std.")] = 3.0,
        samples: Annotated[int, typer.Option(help="Noise draws.")] = 10,
        window: Annotated[int | None, typer.Option(help="Layers restored together for mlp/attn.")] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Also write an interactive HTML figure here.")] = None,
        quiet: Quiet = False,
    ) -> None:
        """Noise the subject, restore states per layer x position, report where the answer recovers."""
        offline_by_default()
        from mechscope.errors import MechscopeError
        from mechscope.locate.causal_tracing import TracingConfig, causal_trace
        from mechscope.model.loading import load_model

        try:
            hm = load_model(model)
            cfg = TracingConfig(noise=noise, samples=samples, window=window)
            result = causal_trace(hm, prompt, subject, target, cfg, progress=not quiet)
            path = result.save(output_path(out, "trace.safetensors"))
            if html is not None:
                write_figure(result.plot(), html)
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        typer.echo(f"p(target) clean {float(result['clean']):.4f}  corrupted {float(result['corrupt']):.4f}")
        typer.echo(f"subject positions {result.config['subject_positions']}")
        typer.echo(f"window: {result.config['window']} layers (cut at the model's ends)")
        subject_last = max(result.config["subject_positions"])
        for kind in result.config["kinds"]:
            layer, pos, value = result.peak(kind)
            typer.echo(f"{kind:6s} peak: layer {layer}, position {result.labels['pos'][pos]}, effect {value:+.4f}")
            layer, _, value = result.peak(kind, [subject_last])
            typer.echo(f"{'':6s} at the subject's last token: layer {layer}, effect {value:+.4f}")
            est = result.peak_estimate(kind, [subject_last])
            span = est.layers[0] if len(est.layers) == 1 else f"{est.layers[0]}-{est.layers[-1]}"
            typer.echo(
                f"{'':6s}   +- {est.stderr:.4f} over {est.n} noise draws; peak in {100 * est.frequency:.0f}% of "
                f"resamples; layers {span} within 2 s.e."
            )
        mlp_layer = result.peak_estimate("mlp", [subject_last]).layer if "mlp" in result.config["kinds"] else None
        if mlp_layer is not None:
            typer.echo(
                f"before editing there: `mechscope edit rome {model} --layer {mlp_layer} ...` reports the "
                "neighbourhood cost (other subjects' answers) with the edit; compare a few layers in the range above"
            )
        typer.echo(f"result -> {path}")
