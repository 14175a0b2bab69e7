"""``mechscope steer ...``: build steering vectors and directions, steer, ablate, orthogonalise."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import Quiet, fail, offline_by_default, output_path, renamed
from mechscope.cli.verb import config_options, run_verb
from mechscope.steer.selection import DirectionSelectionConfig

steer_app = typer.Typer(help="Steer: ablation, steering vectors, directional ablation.", no_args_is_help=True)

CONTRASTS = ("sentiment", "refusal")  # bundled contrast sets: mechscope.data.contrasts
CONTRAST_HELP = (
    f"Bundled contrast ({', '.join(CONTRASTS)}) or a .jsonl file of {{'positive': ..., 'negative': ...}} lines."
)
CHAT_HELP = (
    "Render prompts in the model's chat template: auto (for an instruct model's refusal contrast and your own "
    "files), on, off."
)


def _lines(path: Path | None) -> list[str]:
    from mechscope.data.files import read_prompts

    return [] if path is None else read_prompts(path)


def _pair(
    hm: Any, contrast: str, positive: Path | None, negative: Path | None, *, chat: str = "auto", n: int = 48
) -> tuple[list[str], list[str]]:
    """(positive, negative) prompts, in the chat template where `chat` says so (see CHAT_HELP)."""
    from mechscope.data.contrasts import contrast_for_model

    return contrast_for_model(hm, contrast or None, positive, negative, chat=chat, n=n)


def _ints(text: str) -> list[int] | None:
    from mechscope.errors import ConfigError

    if not text.strip():
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"expected comma-separated integers; got {text!r}") from exc


def _positions(text: str) -> Any:
    return text if text in ("all", "prompt", "generated") else _ints(text)


def _induction(text: str) -> Any:
    from mechscope.errors import ConfigError

    options: dict[str, Any] = {"require": True, "prefer": "prefer", "ignore": False}
    if text not in options:
        raise ConfigError(f"--induction must be one of {list(options)}; got {text!r}")
    return options[text]


@steer_app.command("vector")
def vector_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .safetensors file.")] = None,
    contrast: Annotated[str, typer.Option(help=CONTRAST_HELP)] = "",
    positive: Annotated[Path | None, typer.Option(help="File of positive prompts, one per line.")] = None,
    negative: Annotated[Path | None, typer.Option(help="File of negative prompts, one per line.")] = None,
    chat: Annotated[str, typer.Option(help=CHAT_HELP)] = "auto",
    n_prompts: Annotated[int, typer.Option(help="Prompts per side of a bundled contrast.")] = 48,
    layers: Annotated[str, typer.Option(help="Comma-separated layers (default: all).")] = "",
    kind: Annotated[str | None, typer.Option(help="Residual-width site kind [default: hook_resid_pre].")] = None,
    site: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --kind.")] = None,
    method: Annotated[str, typer.Option(help="mean (CAA difference of means) or pca (RepE).")] = "mean",
    read: Annotated[str, typer.Option(help="last token or mean over tokens.")] = "last",
) -> None:
    """Build a steering vector (positive minus negative) and save it with the model's fingerprint."""
    from mechscope.errors import ConfigError
    from mechscope.steer import mean_difference, pca_direction

    chosen_kind = renamed(kind, site, new="--kind", old="--site") or "hook_resid_pre"
    counts: list[int] = []

    def call(hm: Any) -> Any:
        pos, neg = _pair(hm, contrast, positive, negative, chat=chat, n=n_prompts)
        counts.extend((len(pos), len(neg)))
        if method == "mean":
            return mean_difference(hm, pos, neg, layers=_ints(layers), kind=chosen_kind, read=read)  # type: ignore[arg-type]
        if method == "pca":
            n = min(len(pos), len(neg))
            return pca_direction(hm, pos[:n], neg[:n], layers=_ints(layers), kind=chosen_kind, read=read)  # type: ignore[arg-type]
        raise ConfigError(f"method must be 'mean' or 'pca'; got {method!r}")

    def summary(vec: Any, hm: Any) -> list[str]:
        norms = ", ".join(f"L{k}: {v:.3g}" for k, v in vec.norms().items())
        return [f"{vec!r} from {counts[0]}/{counts[1]} prompts; norms {norms}"]

    run_verb(model, call, out=out, default_name="steering_vector.safetensors", summary=summary)


@steer_app.command("generate")
def generate_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    vector: Annotated[Path, typer.Option(help="Steering vector file (mechscope steer vector).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable).")],
    coefficient: Annotated[float, typer.Option(help="Multiplier of the vector.")] = 1.0,
    positions: Annotated[str, typer.Option(help="all, prompt, generated, or comma-separated indices.")] = "all",
    layers: Annotated[str, typer.Option(help="Comma-separated layers (default: the vector's).")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 20,
) -> None:
    """Greedy generations without and with steering."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.steer import SteeringVector, steer

    try:
        hm = load_model(model)
        vec = SteeringVector.load(vector, hm)
        intervention = steer(hm, vec, coefficient, positions=_positions(positions), layers=_ints(layers))
        before = hm.generate_text(list(prompt), max_new_tokens=max_new_tokens, do_sample=False)
        with intervention:
            after = hm.generate_text(list(prompt), max_new_tokens=max_new_tokens, do_sample=False)
    except MechscopeError as exc:
        raise fail(exc) from exc
    typer.echo(intervention.describe())
    for p, b, a in zip(prompt, before, after, strict=True):
        typer.echo(f"prompt  {p!r}\n  before {b!r}\n  after  {a!r}")


@steer_app.command("direction")
@config_options(DirectionSelectionConfig, exclude=("layers", "positions", "site", "require_induction"))
def direction_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output direction .safetensors file.")] = None,
    prefix: Annotated[
        list[str],
        typer.Option(
            help="How the behaviour begins (repeatable), scored as the log-odds of the whole prefix after the "
            "prompt, any tokenisation (default: the model's refusal openings: ' Sorry' on the organisms; "
            '"I\'m sorry", "I cannot", ... on chat models).'
        ),
    ] = [],  # noqa: B006
    token: Annotated[str | None, typer.Option(help="Deprecated: use --prefix.", hidden=True)] = None,
    contrast: Annotated[str, typer.Option(help=CONTRAST_HELP)] = "",
    positive: Annotated[Path | None, typer.Option(help="Prompts showing the behaviour, one per line.")] = None,
    negative: Annotated[Path | None, typer.Option(help="Prompts without it, one per line.")] = None,
    chat: Annotated[str, typer.Option(help=CHAT_HELP)] = "auto",
    n_prompts: Annotated[int, typer.Option(help="Prompts per side of a bundled contrast.")] = 48,
    retain: Annotated[Path | None, typer.Option(help="Ordinary prompts to spare, one per line.")] = None,
    organism_retain: Annotated[
        bool, typer.Option("--organism-retain", help="Spare the organisms' sentiment/truth/IOI prompts.")
    ] = False,
    layers: Annotated[str, typer.Option(help="Candidate layers (default: first 80 %).")] = "",
    positions: Annotated[str, typer.Option(help="Candidate positions from the end.")] = "-1,-2,-3,-4,-5",
    induction: Annotated[
        str, typer.Option(help="Induction filter: require, prefer (keep inducing candidates if any) or ignore.")
    ] = "prefer",
    *,
    config: DirectionSelectionConfig,
    selection_out: Annotated[Path | None, typer.Option(help="Also save the candidate scores here.")] = None,
    quiet: Quiet = False,
) -> None:
    """Choose a behaviour direction among (layer, position) candidates and save it."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.improve.refusal import refusal_score
    from mechscope.steer import select_direction

    try:
        if token is not None:
            prefix = [*prefix, renamed(None, token, new="--prefix", old="--token")]
        hm = load_model(model)
        pos, neg = _pair(hm, contrast, positive, negative, chat=chat, n=n_prompts)
        from mechscope.data.contrasts import retain_texts

        keep = retain_texts() if organism_retain else (_lines(retain) or None)
        chosen_layers = _ints(layers)
        cfg = replace(
            config,
            layers=tuple(chosen_layers) if chosen_layers else None,
            positions=tuple(_ints(positions) or (-1,)),
            require_induction=_induction(induction),
        )
        score = refusal_score(hm, prefix or None)
        sel = select_direction(hm, pos, neg, score, cfg, retain=keep, progress=not quiet)
        path = sel.direction(hm).save(output_path(out, "direction.safetensors"))
        if selection_out is not None:
            sel.save(selection_out)
    except MechscopeError as exc:
        raise fail(exc) from exc
    members = sel.describe_members()
    what = "chosen" if len(sel.members) == 1 else f"chosen subspace of rank {len(sel.members)}:"
    scored = ", ".join(repr(p) for p in score.prefixes)
    typer.echo(f"{what} {members} (baseline log-odds of {scored}: {sel.config['baseline_positive_score']:.3g})")
    typer.echo(f"direction -> {path}")


@steer_app.command("orthogonalize")
def orthogonalize_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    direction: Annotated[Path, typer.Option(help="Direction file (mechscope steer direction).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the orthogonalised model.")],
) -> None:
    """Write a model whose weights never write along the direction (loads with plain transformers)."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.steer import Direction, orthogonalize

    try:
        hm = load_model(model)
        new = orthogonalize(hm, Direction.load(direction, hm), inplace=True)
        out.mkdir(parents=True, exist_ok=True)
        new.hf_model.save_pretrained(out)
        if new.tokenizer is not None:
            new.tokenizer.save_pretrained(out)
    except MechscopeError as exc:
        raise fail(exc) from exc
    typer.echo(f"orthogonalised model written to {out}")


@steer_app.command("ablate")
def ablate_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    site: Annotated[list[str], typer.Option("--site", "-s", help="Site to ablate (repeatable).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable).")],
    method: Annotated[str, typer.Option(help="zero, mean, resample or scale.")] = "zero",
    heads: Annotated[str, typer.Option(help="Comma-separated heads.")] = "",
    neurons: Annotated[str, typer.Option(help="Comma-separated neurons (last axis).")] = "",
    positions: Annotated[str, typer.Option(help="Comma-separated positions.")] = "",
    factor: Annotated[float, typer.Option(help="Multiplier for method=scale.")] = 0.0,
    reference: Annotated[Path | None, typer.Option(help="Reference/source prompts for mean/resample.")] = None,
    over: Annotated[str, typer.Option(help="Mean over 'batch' (per position) or 'tokens'.")] = "tokens",
    top: Annotated[int, typer.Option(help="Top next tokens to show.")] = 5,
) -> None:
    """Next-token predictions of prompts without and with an ablation."""
    offline_by_default()
    import torch

    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.steer import Ablation, AblationConfig

    try:
        hm = load_model(model)
        cfg = AblationConfig(
            method=method,  # type: ignore[arg-type]
            heads=_ints(heads),  # type: ignore[arg-type]
            neurons=_ints(neurons),  # type: ignore[arg-type]
            positions=_ints(positions),  # type: ignore[arg-type]
            factor=factor,
            over=over,  # type: ignore[arg-type]
        )
        ref = _lines(reference) or None
        ablation = Ablation(hm, site, cfg, reference=ref)
        batch = hm.to_tokens(list(prompt), padding_side="left")  # the last column is each prompt's last token
        with torch.no_grad():
            before = hm.forward(batch)
            with ablation:
                after = hm.forward(batch)
    except MechscopeError as exc:
        raise fail(exc) from exc
    typer.echo(ablation.describe())
    for i, p in enumerate(prompt):
        typer.echo(f"prompt {p!r}")
        for name, logits in (("before", before), ("after", after)):
            probs = logits[i, -1].float().softmax(-1)
            vals, ids = probs.topk(top)
            shown = ", ".join(f"{hm.to_string([int(t)])!r} {float(v):.3f}" for v, t in zip(vals, ids, strict=True))
            typer.echo(f"  {name:6s} {shown}")


__all__ = ["steer_app"]
