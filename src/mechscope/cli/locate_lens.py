"""``mechscope locate logit-lens | tuned-lens-train | tuned-lens``: vocabulary projections."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import Quiet, fail, offline_by_default, output_path
from mechscope.cli.verb import config_options, run_verb
from mechscope.locate.tuned_lens import TunedLensConfig


def read_prompts(prompts: list[str], prompt_file: Path | None) -> list[str]:
    """Prompts from repeated --prompt options and/or a file with one prompt per line."""
    from mechscope.io import read_text

    out = list(prompts)
    if prompt_file is not None:
        out += [line for line in read_text(prompt_file, "prompt list").splitlines() if line.strip()]
    if not out:
        raise typer.BadParameter("give at least one --prompt or a --prompt-file")
    return out


Model = Annotated[str, typer.Argument(help="Model folder or bundled model name.")]
Prompts = Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeatable).")]
PromptFile = Annotated[Path | None, typer.Option(help="File with one prompt per line.")]
Html = Annotated[Path | None, typer.Option(help="Also write an interactive HTML figure here.")]


def _lens_lines(hm: Any, result: Any, prompts: list[str], top: int) -> Iterator[str]:
    """Mean KL over text tokens (no pads, no BOS) per layer, then the top tokens at each prompt's last token."""
    import json

    import torch

    res: Any = result
    kl = res.mean_kl()
    yield f"{'layer':14s} {'KL (nats, text tokens)':>22s}"
    for label, value in zip(res.labels["layer"], kl.tolist(), strict=True):
        yield f"{label:14s} {value:22.4f}"
    mask = res["attention_mask"] if "attention_mask" in res.tensors else None
    k = min(top, res["top_tokens"].shape[-1])
    for b, text in enumerate(prompts):
        last = int(torch.nonzero(mask[b]).max()) if mask is not None else res["top_tokens"].shape[2] - 1
        yield f"top {k} tokens at the last token of {text!r}:"
        for li, label in enumerate(res.labels["layer"]):
            ids = res["top_tokens"][li, b, last, :k].tolist()
            probs = res["top_probs"][li, b, last, :k].tolist()
            shown = "  ".join(
                f"{json.dumps(hm.to_string([int(i)]), ensure_ascii=False)} {p:.3f}"
                for i, p in zip(ids, probs, strict=True)
            )
            yield f"  {label:14s} {shown}"


def register(app: typer.Typer) -> None:
    @app.command("logit-lens")
    def logit_lens_cmd(
        model: Model,
        prompt: Prompts = [],  # noqa: B006
        prompt_file: PromptFile = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Html = None,
        top: Annotated[int, typer.Option(help="Top tokens shown per layer (at each prompt's last token).")] = 3,
        batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (lower it when memory runs out).")] = 32,
    ) -> None:
        """Logit lens: per-layer KL to the final distribution and top tokens."""
        from mechscope.cli.memory import check_batch_size, memory_knob
        from mechscope.errors import ConfigError, MechscopeError
        from mechscope.locate.lens import logit_lens

        try:
            check_batch_size(batch_size)
            if top < 1:
                raise ConfigError(f"--top must be a positive number of tokens; got {top}")
            prompts = read_prompts(prompt, prompt_file)
        except MechscopeError as exc:
            raise fail(exc) from exc

        def call(hm: Any) -> Any:
            with memory_knob("--batch-size", batch_size):
                return logit_lens(hm, prompts, batch_size=batch_size)

        def summary(result: Any, hm: Any) -> Iterator[str]:
            return _lens_lines(hm, result, prompts, top)

        run_verb(model, call, out=out, default_name="logit_lens.safetensors", html=html, summary=summary)

    @app.command("tuned-lens-train")
    @config_options(TunedLensConfig)
    def tuned_lens_train_cmd(
        model: Model,
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="Lens file (default: ./mechscope-out, never replacing a file)."),
        ] = None,
        text_file: Annotated[
            Path | None,
            typer.Option(
                help="Training text, one document per line (default: organisms' text on an organism, else English)."
            ),
        ] = None,
        *,
        config: TunedLensConfig,
        quiet: Quiet = False,
    ) -> None:
        """Train a tuned lens on a text stream, save it and print held-out KL of both lenses."""
        offline_by_default()
        from mechscope.cli.common import load_model
        from mechscope.data.corpus import default_stream, english_texts
        from mechscope.errors import MechscopeError
        from mechscope.locate.tuned_lens import compare_lenses, token_windows, train_tuned_lens, zoo_texts

        try:
            hm = load_model(model)
            cfg, seed, seq_len = config, config.seed, config.seq_len
            if text_file is not None:
                texts = [line for line in text_file.read_text().splitlines() if line.strip()]
                train, held = texts[: int(len(texts) * 0.9)], texts[int(len(texts) * 0.9) :]
            elif default_stream(hm) == "zoo":
                train, held = zoo_texts(seed), zoo_texts(seed, split="eval")
            else:  # a real model: English text (stdlib docstrings, held out by module), not the organisms' text
                train, held = english_texts("train", seed), english_texts("eval", seed)
            lens = train_tuned_lens(hm, train, config=cfg, progress=not quiet)
            lens_path = lens.save(output_path(out, "tuned_lens_translators.safetensors"))
            typer.echo(f"lens -> {lens_path}")
            kept = lens.training_log.get("validation", {}).get("kept_before", [])
            if kept:
                typer.echo(f"layers left as before training (trained, they read held-out windows worse): {kept}")
            held_windows = token_windows(hm, held, seq_len=seq_len, max_windows=16)
            comparison = compare_lenses(hm, held_windows, lens, progress=not quiet)
        except (MechscopeError, ValueError) as exc:
            raise fail(exc) from exc
        typer.echo("layer           logit-lens KL  tuned-lens KL  (held-out text)")
        for label, a, b in zip(
            comparison.labels["layer"], comparison["logit_lens_kl"].tolist(), comparison["tuned_lens_kl"].tolist()
        ):
            typer.echo(f"{label:14s} {a:14.4f} {b:14.4f}")
        typer.echo(f"lens -> {lens_path}")

    @app.command("tuned-lens")
    def tuned_lens_cmd(
        model: Model,
        lens: Annotated[Path, typer.Option(help="Lens file from `tuned-lens-train`.")],
        prompt: Prompts = [],  # noqa: B006
        prompt_file: PromptFile = None,
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="Result file (default: ./mechscope-out, never replacing a file)."),
        ] = None,
        html: Html = None,
    ) -> None:
        """Read prompts through a trained tuned lens (per-layer KL and top tokens)."""
        from mechscope.locate.tuned_lens import TunedLens, tuned_lens

        def summary(result: Any, hm: Any) -> Iterator[str]:
            for label, value in zip(result.labels["layer"], result.mean_kl().tolist(), strict=True):
                yield f"{label:14s} KL {value:8.4f}  (mean over text tokens)"

        run_verb(
            model,
            lambda hm: tuned_lens(hm, read_prompts(prompt, prompt_file), TunedLens.load(lens)),
            out=out,
            default_name="tuned_lens_readout.safetensors",
            html=html,
            summary=summary,
        )
