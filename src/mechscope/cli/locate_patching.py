"""``mechscope locate patch | path-patch | atp``: activation patching, path patching, attribution patching.

All three compare a clean and a corrupted prompt set (same token lengths) with a logit-difference
metric at the last position: ``logit[answer] - logit[wrong]``, one answer/wrong token per prompt
(or one for all).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.cells import echo_effects
from mechscope.cli.common import Quiet, fail
from mechscope.cli.verb import config_options, run_verb
from mechscope.locate.attribution_patching import AtPConfig

Model = Annotated[str, typer.Argument(help="Model folder or bundled model name.")]
Clean = Annotated[list[str], typer.Option("--clean", "-c", help="Clean prompt (repeatable).")]
Corrupt = Annotated[
    list[str], typer.Option("--corrupt", "-x", help="Corrupted prompt, same token length (repeatable).")
]
Answer = Annotated[list[str], typer.Option("--answer", "-a", help="Correct next token (one, or one per prompt).")]
Wrong = Annotated[list[str], typer.Option("--wrong", "-w", help="Incorrect next token (one, or one per prompt).")]
Direction = Annotated[str, typer.Option(help="denoising (restore clean) or noising (insert corrupt).")]
Html = Annotated[Path | None, typer.Option(help="Also write an interactive HTML figure here.")]


def logit_diff_metric(hm: Any, answer: list[str], wrong: list[str], n_prompts: int) -> Callable[[Any], Any]:
    """``logit[answer] - logit[wrong]`` at the last position, per prompt."""
    from mechscope.errors import ConfigError
    from mechscope.locate.metrics import logit_diff

    for name, tokens in (("--answer", answer), ("--wrong", wrong)):
        if len(tokens) not in (1, n_prompts):
            raise ConfigError(f"give one {name} token or one per prompt ({n_prompts}); got {len(tokens)}")
    good = [hm.to_single_token(t) for t in answer]
    bad = [hm.to_single_token(t) for t in wrong]
    good_ids: Any = good[0] if len(good) == 1 else good
    bad_ids: Any = bad[0] if len(bad) == 1 else bad
    return lambda logits: logit_diff(logits, good_ids, bad_ids)


def _runs(result: Any) -> tuple[float, float]:
    """The clean and corrupt metric of a patching result (for :func:`echo_effects`)."""
    return float(result["clean"].float().mean()), float(result["corrupt"].float().mean())


def _heads(text: str) -> list[tuple[int, int]]:
    """``"2.1,2.5"`` -> ``[(2, 1), (2, 5)]``."""
    from mechscope.errors import ConfigError

    out = []
    for item in text.split(","):
        parts = item.strip().split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"a sender set is 'layer.head,layer.head' (e.g. 2.1,2.5); got {text!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def register(app: typer.Typer) -> None:
    @app.command("patch")
    def patch_cmd(
        model: Model,
        clean: Clean,
        corrupt: Corrupt,
        answer: Answer,
        wrong: Wrong,
        kind: Annotated[
            str, typer.Option(help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|heads|q|k|v|pattern|neurons")
        ] = "resid_pre",
        direction: Direction = "denoising",
        per_position: Annotated[bool, typer.Option(help="Heads: sweep layer x head x position.")] = False,
        per_head: Annotated[bool, typer.Option(help="Heads: sweep per head (else per position).")] = True,
        method: Annotated[str, typer.Option(help="batched or loop (reference).")] = "batched",
        chunk_size: Annotated[int, typer.Option(help="Patched variants per forward.")] = 32,
        batch_size: Annotated[
            int,
            typer.Option(
                help="Prompt pairs per sweep; effects are averaged over batches (lower it if memory runs out)."
            ),
        ] = 32,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Html = None,
        quiet: Quiet = False,
    ) -> None:
        """Activation patching sweep; prints the cells with the largest effect (raw and normalised)."""
        from mechscope.cli.memory import check_batch_size, mean_over_batches, memory_knob, take_rows
        from mechscope.errors import MechscopeError
        from mechscope.locate.patching import activation_patch, check_pair

        try:
            check_batch_size(batch_size)
        except MechscopeError as exc:
            raise fail(exc) from exc

        def call(hm: Any) -> Any:
            logit_diff_metric(hm, answer, wrong, len(clean))  # checks the token counts once
            # One tokenization (one padding) for every batch, so the batches' sweeps share positions.
            clean_t, corrupt_t = hm.prepare_inputs(clean), hm.prepare_inputs(corrupt)
            check_pair(clean_t, corrupt_t)

            def sweep(rows: slice) -> Any:
                def part(tokens: list[str]) -> list[str]:
                    return tokens if len(tokens) == 1 else tokens[rows]

                n = rows.stop - rows.start
                return activation_patch(
                    hm,
                    take_rows(clean_t, rows),
                    take_rows(corrupt_t, rows),
                    kind,
                    logit_diff_metric(hm, part(answer), part(wrong), n),
                    direction=direction,
                    per_head=per_head,
                    per_position=per_position,
                    method=method,
                    chunk_size=chunk_size,
                    progress=not quiet,
                )

            with memory_knob("--batch-size", batch_size):
                return mean_over_batches(sweep, len(clean), batch_size)

        def summary(result: Any, hm: Any) -> list[str]:
            start = result["corrupt"] if direction == "denoising" else result["clean"]
            clean_m, corrupt_m = _runs(result)
            lines: list[str] = []
            raw, axes, tokens = result["metric"] - start, result.axes["metric"], hm.to_str_tokens(clean[0])
            echo_effects(lines.append, raw, axes, result.labels, clean=clean_m, corrupt=corrupt_m, tokens=tokens)
            return lines

        run_verb(model, call, out=out, default_name="patch.safetensors", html=html, summary=summary)

    @app.command("path-patch")
    def path_patch_cmd(
        model: Model,
        clean: Clean,
        corrupt: Corrupt,
        answer: Answer,
        wrong: Wrong,
        receiver: Annotated[
            list[str], typer.Option(help="Receiver 'layer.head.q|k|v' (repeatable; default: the logits).")
        ] = [],  # noqa: B006
        sender: Annotated[
            list[str],
            typer.Option(help="Sender set 'layer.head,layer.head' patched together (repeatable; default: each head)."),
        ] = [],  # noqa: B006
        direction: Annotated[str, typer.Option(help="noising (the paper's) or denoising.")] = "noising",
        freeze_mlps: Annotated[bool, typer.Option(help="Freeze MLPs too (direct head paths only).")] = True,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Html = None,
        quiet: Quiet = False,
    ) -> None:
        """Path patching from every head (sender) to the logits or to receiver heads' inputs."""
        from mechscope.errors import ConfigError, MechscopeError
        from mechscope.locate.path_patching import Receiver, path_patch

        try:
            receivers: Any = "logits"
            if receiver:
                receivers = []
                for text in receiver:
                    parts = text.split(".")
                    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
                        raise ConfigError(f"a receiver is 'layer.head.q|k|v' (e.g. 3.1.q); got {text!r}")
                    receivers.append(Receiver(int(parts[0]), int(parts[1]), parts[2]))
            senders = [_heads(text) for text in sender] or None
        except MechscopeError as exc:
            raise fail(exc) from exc

        def call(hm: Any) -> Any:
            metric = logit_diff_metric(hm, answer, wrong, len(clean))
            return path_patch(
                hm,
                clean,
                corrupt,
                metric,
                receivers=receivers,
                senders=senders,
                direction=direction,
                freeze_mlps=freeze_mlps,
                progress=not quiet,
            )

        def summary(result: Any, hm: Any) -> list[str]:
            clean_m, corrupt_m = _runs(result)
            lines: list[str] = []
            axes = result.axes["metric"]
            echo_effects(
                lines.append, result.effect(), axes, result.labels, clean=clean_m, corrupt=corrupt_m, what="sender"
            )
            return lines

        run_verb(model, call, out=out, default_name="path_patch.safetensors", html=html, summary=summary)

    @app.command("atp")
    @config_options(AtPConfig)
    def atp_cmd(
        model: Model,
        clean: Clean,
        corrupt: Corrupt,
        answer: Answer,
        wrong: Wrong,
        *,
        config: AtPConfig,
        compare: Annotated[bool, typer.Option(help="Also run exact head patching and report agreement.")] = False,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        quiet: Quiet = False,
    ) -> None:
        """Attribution patching of every head, neuron and residual position (AtP, AtP*)."""
        from mechscope.locate.attribution_patching import atp_vs_exact, attribution_patch

        direction = config.direction
        comparisons: list[Any] = []

        def call(hm: Any) -> Any:
            metric = logit_diff_metric(hm, answer, wrong, len(clean))
            result = attribution_patch(hm, clean, corrupt, metric, config, progress=not quiet)
            if compare:
                comparisons.append(atp_vs_exact(hm, clean, corrupt, metric, direction=direction, progress=not quiet))
            return result

        def summary(result: Any, hm: Any) -> list[str]:
            base, source = float(result["base"]), float(result["source"])
            clean_m, corrupt_m = (source, base) if direction == "denoising" else (base, source)
            lines = ["AtP estimates (first-order), per head:"]
            axes = result.axes["heads"]
            echo_effects(
                lines.append, result["heads"], axes, result.labels, clean=clean_m, corrupt=corrupt_m, what="head"
            )
            for comparison in comparisons:
                c = comparison.config
                lines.append(f"AtP vs exact (heads): spearman {c['spearman']:.3f}  pearson {c['pearson']:.3f}")
                for d in c["top_disagreements"][:5]:
                    lines.append(f"  L{d['layer']} {d['head']}: atp {d['atp']:+.4f}  exact {d['exact']:+.4f}")
            return lines

        run_verb(model, call, out=out, default_name="atp.safetensors", summary=summary)
