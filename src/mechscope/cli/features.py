"""``mechscope features``: train a sparse autoencoder (or transcoder) on a site, and evaluate a saved one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import fail, offline_by_default, output_path
from mechscope.cli.verb import config_options
from mechscope.features.train import SAETrainConfig

features_app = typer.Typer(
    help="Sparse autoencoders and transcoders: collect, train, evaluate, describe, dashboard.", no_args_is_help=True
)

TextFile = Annotated[
    Path | None,
    typer.Option(
        help="Text file, one document per line (default: the organisms' text on an organism, English otherwise)."
    ),
]
ModelArg = Annotated[str, typer.Argument(help="Model folder or bundled model name.")]
SaeArg = Annotated[Path, typer.Argument(help="A saved SAE (.safetensors), or a SAELens-format folder.")]
SeqLen = Annotated[int, typer.Option(help="Row length when packing text.")]


def _load(model: str, sae_path: Path) -> tuple[Any, Any]:
    """The model and the saved SAE, which must name its site."""
    from mechscope.cli.common import load_model
    from mechscope.errors import ConfigError
    from mechscope.features import load_sae

    sae = load_sae(sae_path)
    if not sae.config.site:
        raise ConfigError(f"the SAE at {sae_path} names no site; save it with SAEConfig(site=...)")
    return load_model(model), sae


def _texts(text_file: Path | None, hm: Any) -> list[str]:
    """The text file's lines, else the model's default text: the organisms' text on an organism, English
    (standard-library docstrings) on any other model (mechscope.data.corpus)."""
    if text_file is None:
        from mechscope.data.corpus import default_stream, english_texts
        from mechscope.steer.editing.stats import zoo_texts

        return list(zoo_texts(0)) if default_stream(hm) == "zoo" else english_texts("train", 0)
    texts = [line for line in text_file.read_text().splitlines() if line.strip()]
    if len(texts) < 2:
        from mechscope.errors import ConfigError

        raise ConfigError(f"expected a text file with at least 2 non-empty lines, got {len(texts)} in {text_file}")
    return texts


def _report(hm: Any, sae: Any, texts: list[str], held_out_tokens: int, seq_len: int) -> dict:
    from mechscope.features import collect_activations, downstream_loss, reconstruction_metrics

    held = texts[-max(1, len(texts) // 10) :]  # the last tenth of the documents is held out
    config = sae.config
    x = collect_activations(hm, config.site, held, seq_len=seq_len, max_tokens=held_out_tokens)
    y = (
        collect_activations(hm, config.out_site, held, seq_len=seq_len, max_tokens=held_out_tokens)
        if config.transcoder
        else None
    )
    return {**reconstruction_metrics(sae, x, y), **downstream_loss(hm, sae, held, seq_len=seq_len)}


@features_app.command("train")
@config_options(SAETrainConfig, param="train", names={"l1_coefficient": ("--l1-coefficient", "--l1")})
def train_cmd(
    model: ModelArg,
    site: Annotated[str, typer.Option("--site", "-s", help="Site with one vector per token.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to save the SAE (.safetensors + .json).")],
    out_site: Annotated[
        str, typer.Option(help="Train a transcoder reconstructing this site (e.g. blocks.1.hook_mlp_out).")
    ] = "",
    d_sae: Annotated[int, typer.Option(help="Number of features.")] = 1024,
    activation: Annotated[str, typer.Option(help="'topk' or 'relu' (L1 penalty).")] = "topk",
    k: Annotated[int, typer.Option(help="Active features per token (topk).")] = 32,
    *,
    train: SAETrainConfig,
    max_tokens: Annotated[int, typer.Option(help="Training tokens to collect.")] = 100_000,
    seq_len: SeqLen = 64,
    text_file: TextFile = None,
) -> None:
    """Collect the site's activations, train an SAE (a transcoder with --out-site), save it, report
    held-out reconstruction and loss."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.features import SAEConfig, collect_activations, train_sae
    from mechscope.io import ModelInfo

    try:
        hm = load_model(model)
        texts = _texts(text_file, hm)
        train_texts = texts[: len(texts) - max(1, len(texts) // 10)]
        acts = collect_activations(hm, site, train_texts, seq_len=seq_len, max_tokens=max_tokens)
        targets = None
        if out_site:
            targets = collect_activations(hm, out_site, train_texts, seq_len=seq_len, max_tokens=max_tokens)
        config = SAEConfig(
            d_in=acts.shape[1],
            d_sae=d_sae,
            activation=activation,
            k=k if activation == "topk" else None,
            site=site,
            d_out=None if targets is None else targets.shape[1],
            out_site=out_site,
        )
        sae, log = train_sae(acts, config, train, targets)
        sae.model_info = ModelInfo.of(hm)  # the saved SAE knows its model (refused on another one)
        path = sae.save(out)
        report = _report(hm, sae, texts, max(1000, max_tokens // 10), seq_len)
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    typer.echo(f"trained on {acts.shape[0]} tokens; last step: {json.dumps(log[-1])}")
    typer.echo("held out: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    typer.echo(f"SAE -> {path}")


@features_app.command("eval")
def eval_cmd(
    model: ModelArg,
    sae_path: SaeArg,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens for reconstruction metrics.")] = 10_000,
    seq_len: SeqLen = 64,
    text_file: TextFile = None,
) -> None:
    """Reconstruction (FVU, L0, dead features) and loss recovered of a saved SAE at its site."""
    offline_by_default()
    from mechscope.errors import MechscopeError

    try:
        hm, sae = _load(model, sae_path)
        report = _report(hm, sae, _texts(text_file, hm), max_tokens, seq_len)
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    where = sae.config.site + (f" -> {sae.config.out_site}" if sae.config.out_site else "")
    typer.echo(f"{where}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))


@features_app.command("cards")
def cards_cmd(
    model: ModelArg,
    sae_path: SaeArg,
    feature: Annotated[list[int], typer.Option("--feature", "-f", help="Feature (repeatable; default: all).")] = [],  # noqa: B006
    top_k: Annotated[int, typer.Option(help="Top-activating contexts per feature.")] = 5,
    context: Annotated[int, typer.Option(help="Tokens of context before the active one.")] = 8,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write the cards (JSON; default: ./mechscope-out, never replacing a file)."
        ),
    ] = None,
    seq_len: SeqLen = 64,
    text_file: TextFile = None,
) -> None:
    """Top-activating contexts, firing frequency and promoted tokens of SAE features, as JSON."""
    offline_by_default()
    from mechscope.errors import MechscopeError
    from mechscope.features import feature_cards, save_cards

    try:
        hm, sae = _load(model, sae_path)
        texts = _texts(text_file, hm)
        cards = feature_cards(hm, sae, texts, feature or None, top_k=top_k, context=context, seq_len=seq_len)
        path = save_cards(cards, output_path(out, "cards.json"))
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    for card in list(cards)[:20]:
        best = card.top_contexts[0] if card.top_contexts else None
        where = (
            "never fires"
            if best is None
            else "".join(best["tokens"][: best["active"]]) + f"[[{best['tokens'][best['active']]}]]"
        )
        typer.echo(f"feature {card.feature}: frequency {card.frequency:.4f}, max {card.max_activation:.3g}: {where!r}")
    typer.echo(f"{len(cards)} cards -> {path}")


@features_app.command("collect")
def collect_cmd(
    model: ModelArg,
    site: Annotated[list[str], typer.Option("--site", "-s", help="Site with one vector per token (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Store folder (resumes an incomplete one).")],
    dtype: Annotated[str, typer.Option(help="Storage dtype: fp32, bf16 or fp16.")] = "bf16",
    max_tokens: Annotated[int, typer.Option(help="Tokens to collect (0: the whole corpus).")] = 1_000_000,
    rows_per_shard: Annotated[int, typer.Option(help="Token rows per shard file.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 32,
    seq_len: SeqLen = 128,
    text: Annotated[Path | None, typer.Option(help="Text file or folder (one document per line).")] = None,
) -> None:
    """Collect activations into a sharded store on disk (resumable after a kill)."""
    offline_by_default()
    import time

    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.features import collect_store

    try:
        hm = load_model(model)
        corpus: Any = text if text is not None else _texts(None, hm)
        start = time.perf_counter()
        store = collect_store(
            hm, site, corpus, out, dtype=dtype, seq_len=seq_len, rows_per_shard=rows_per_shard,
            max_tokens=max_tokens or None, batch_size=batch_size, progress=True,
        )  # fmt: skip
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    seconds = time.perf_counter() - start
    size = store.manifest.bytes
    typer.echo(f"{store}")
    typer.echo(
        f"{store.n_tokens} tokens, {size / 1e6:.1f} MB ({size / max(1, store.n_tokens):.0f} bytes/token), "
        f"{seconds:.1f} s this run"
    )


@features_app.command("train-store")
@config_options(SAETrainConfig, param="train", defaults={"steps": 5000, "batch_size": 4096})
def train_store_cmd(
    store_path: Annotated[Path, typer.Argument(help="An activation store folder.")],
    site: Annotated[str, typer.Option("--site", "-s", help="Site in the store to train on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to save the SAE (.safetensors).")],
    out_site: Annotated[str, typer.Option(help="Train a transcoder reconstructing this stored site.")] = "",
    activation: Annotated[str, typer.Option(help="relu, topk, batchtopk or jumprelu.")] = "topk",
    d_sae: Annotated[int, typer.Option(help="Number of features.")] = 4096,
    k: Annotated[int, typer.Option(help="Active features per token (topk, batchtopk).")] = 32,
    *,
    train: SAETrainConfig,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint file (resumes when it exists).")] = None,
) -> None:
    """Train an SAE (or transcoder) from an activation store, with checkpoints."""
    from mechscope.errors import MechscopeError
    from mechscope.features import ActivationStore, SAEConfig, train_sae
    from mechscope.features.evals import reconstruction_metrics

    try:
        store = ActivationStore(store_path)
        config = SAEConfig(
            d_in=store.width(site),
            d_sae=d_sae,
            activation=activation,
            k=k if activation in ("topk", "batchtopk") else None,
            site=site,
            d_out=store.width(out_site) if out_site else None,
            out_site=out_site,
        )
        sae, log = train_sae(store, config, train, checkpoint=checkpoint, progress=True)
        sae.model_info = store.manifest.model
        path = sae.save(out)
        x = store.activations(site, max_tokens=50_000)
        y = store.activations(out_site, max_tokens=50_000) if out_site else None
        metrics = reconstruction_metrics(sae, x, y)
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    typer.echo(f"last step: {json.dumps(log[-1])}")
    typer.echo("on stored tokens: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    typer.echo(f"SAE -> {path}")


@features_app.command("dashboard")
def dashboard_cmd(
    model: ModelArg,
    sae_path: SaeArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write.")] = Path("features.html"),
    feature: Annotated[
        list[int], typer.Option("--feature", "-f", help="Feature (repeatable; default: first 64).")
    ] = [],  # noqa: B006
    describe: Annotated[bool, typer.Option(help="Add baseline descriptions, detection and causal scores.")] = True,
    endpoint: Annotated[
        str, typer.Option(help="OpenAI-compatible endpoint for descriptions (e.g. http://127.0.0.1:8080/v1).")
    ] = "",
    seq_len: SeqLen = 64,
    text_file: TextFile = None,
) -> None:
    """Write a self-contained HTML dashboard of SAE features (cards, descriptions, scores)."""
    offline_by_default()
    from mechscope.errors import MechscopeError
    from mechscope.features import feature_cards
    from mechscope.features.autointerp import ChatExplainer, OpenAIChat, annotate_cards, describe_features
    from mechscope.features.dashboard import write_dashboard
    from mechscope.features.store import token_rows

    try:
        hm, sae = _load(model, sae_path)
        texts = _texts(text_file, hm)
        chosen = feature or list(range(min(64, sae.config.d_sae)))
        cards = feature_cards(hm, sae, texts, chosen, seq_len=seq_len)
        if describe:
            explainer = ChatExplainer(OpenAIChat(endpoint)) if endpoint else None
            rows = token_rows(hm, texts, seq_len)[:256]
            cards = annotate_cards(cards, describe_features(hm, sae, rows, chosen, explainer=explainer))
        path = write_dashboard(cards, out)
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    typer.echo(f"{len(cards)} features -> {path}")


@features_app.command("export-saelens")
def export_saelens_cmd(
    sae_path: SaeArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (cfg.json + sae_weights.safetensors).")],
    model_name: Annotated[str, typer.Option(help="model_name to record in cfg.json.")] = "",
) -> None:
    """Write a saved SAE in SAELens's on-disk format."""
    from mechscope.errors import MechscopeError
    from mechscope.features import load_sae, save_saelens

    try:
        folder = save_saelens(load_sae(sae_path), out, model_name=model_name)
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    typer.echo(f"SAELens folder -> {folder}")


__all__ = ["features_app"]
