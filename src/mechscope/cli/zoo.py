"""``mechscope zoo``: build the corpus, train, list and evaluate the bundled model organisms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import offline_by_default

zoo_app = typer.Typer(help="Bundled model organisms with planted mechanisms.", no_args_is_help=True)

DEFAULT_CACHE = Path(".cache/zoo")
DEFAULT_CORPUS = DEFAULT_CACHE / "corpus"


@zoo_app.command("corpus")
def corpus_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write the corpus into.")] = DEFAULT_CORPUS,
    text_dir: Annotated[Path | None, typer.Option(help="Use *.txt files here instead of Debian packages.")] = None,
    fetch_debian: Annotated[
        bool,
        typer.Option(
            "--fetch-debian",
            help="Without --text-dir: run apt-get update and download Debian text packages (network, root).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the shuffles, the split and the planted tasks.")] = 0,
    max_chars_per_source: Annotated[int, typer.Option(help="Cap on natural text per source.")] = 2_000_000,
) -> None:
    """Build the training corpus (natural text + planted-task text) with a checksummed manifest."""
    from mechscope.zoo.corpus import CorpusOptions, build_corpus

    offline_by_default()
    if text_dir is None and not fetch_debian:
        raise typer.BadParameter(
            "give the natural text: --text-dir FOLDER of *.txt files, or --fetch-debian to let this command run "
            "apt-get update and download Debian's text packages (never done without asking)"
        )
    if text_dir is not None and fetch_debian:
        raise typer.BadParameter("give either --text-dir or --fetch-debian, not both")
    manifest = build_corpus(
        CorpusOptions(out=out, seed=seed, max_chars_per_source=max_chars_per_source, text_dir=text_dir)
    )
    for name, info in manifest["files"].items():
        typer.echo(f"{name:28s} {info['documents']:>7d} docs {info['chars']:>10d} chars  {info['sha256'][:12]}")
    typer.echo(f"manifest: {out / 'manifest.json'}")


@zoo_app.command("tokenizer")
def tokenizer_cmd(
    corpus: Annotated[Path, typer.Option(help="Corpus folder (from `zoo corpus`).")] = DEFAULT_CORPUS,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the shipped tokenizer).")] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size.")] = 4096,
) -> None:
    """Train the byte-level BPE tokenizer on the corpus."""
    from mechscope.zoo.corpus import verify_corpus
    from mechscope.zoo.tokenizer import ASSET_DIR, train_tokenizer

    offline_by_default()
    verify_corpus(corpus)
    tok = train_tokenizer(corpus, out or ASSET_DIR, vocab_size)
    typer.echo(f"tokenizer with {len(tok)} tokens saved to {out or ASSET_DIR}")


@zoo_app.command("train")
def train_cmd(
    name: Annotated[str, typer.Argument(help="Organism recipe name (see `mechscope zoo list --recipes`).")],
    corpus: Annotated[Path, typer.Option(help="Corpus folder (from `zoo corpus`).")] = DEFAULT_CACHE / "corpus",
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints and log (default .cache/zoo/runs/NAME).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder to save the trained model into.")] = None,
    into_package: Annotated[
        bool,
        typer.Option("--into-package", help="Save into the installed package's organism folder (replaces it)."),
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: min(2, cores)).")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the recipe's step count (smoke tests).")] = None,
    tokenizer_dir: Annotated[Path | None, typer.Option(help="Tokenizer folder (default: the shipped one).")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Folder of the recipe's warm-start weights (recipes that continue a version).")
    ] = None,
) -> None:
    """Train an organism, save it with its tokenizer, evaluate it and write its model card."""
    from mechscope.zoo.build import build_organism
    from mechscope.zoo.corpus import verify_corpus
    from mechscope.zoo.organisms import get_recipe
    from mechscope.zoo.tokenizer import ASSET_DIR
    from mechscope.zoo.train import TrainOptions

    offline_by_default()
    recipe = get_recipe(name)
    opts = TrainOptions(
        corpus=corpus,
        run_dir=run_dir or DEFAULT_CACHE / "runs" / name,
        tokenizer_dir=tokenizer_dir or ASSET_DIR,
        resume=resume,
        threads=threads,
        steps=steps,
        init_dir=init_from,
    )
    verify_corpus(corpus)
    if out is not None and into_package:
        raise typer.BadParameter("give either --out FOLDER or --into-package, not both")
    if out is None and not into_package:
        raise typer.BadParameter(
            "say where the model goes: --out FOLDER, or --into-package to replace the shipped organism "
            "(never done by default)"
        )
    record = build_organism(recipe, opts, out)
    typer.echo(json.dumps(record, indent=1))


@zoo_app.command("card")
def card_cmd(name: Annotated[str, typer.Argument(help="Bundled organism name.")]) -> None:
    """Re-render an organism's MODEL_CARD.md from its metrics.json and NOTES.md (no retraining)."""
    from mechscope.zoo.cards import refresh_folder_card
    from mechscope.zoo.loading import resolve_folder
    from mechscope.zoo.organisms import get_recipe

    folder = resolve_folder(name)
    if not refresh_folder_card(folder):  # an organism, organism-liar or a variant
        get_recipe(folder.name)  # raises the unknown-recipe error
    typer.echo(f"wrote {folder / 'MODEL_CARD.md'}")


@zoo_app.command("list")
def list_cmd(
    recipes: Annotated[bool, typer.Option("--recipes", help="List trainable recipes instead.")] = False,
) -> None:
    """List the bundled organisms and the real models (or the recipes that `zoo train` knows)."""
    if recipes:
        from mechscope.zoo.organisms import RECIPES

        for r in RECIPES.values():
            typer.echo(f"{r.name:20s} {r.architecture:6s} {r.description}")
        return
    from mechscope.model.sources.names import list_models

    typer.echo(f"{'name':34s} {'kind':8s} {'architecture':18s} {'size':>8s}  {'licence':18s} description")
    for e in list_models(include_real=True, include_variants=True):
        if e.kind in ("organism", "variant"):
            weights = e.path / ("model.safetensors" if e.kind == "organism" else "delta.safetensors")
            size = f"{weights.stat().st_size / 1e6:5.1f} MB"
        else:
            size = "package" if e.installed else "missing"
        typer.echo(f"{e.name:34s} {e.kind:8s} {e.architecture:18s} {size:>8s}  {e.licence:18s} {e.description}")
    for e in list_models(include_real=True):
        if not e.installed:
            typer.echo(f"  {e.name}: not installed; {e.install_hint}")


@zoo_app.command("build-variants")
def build_variants_cmd(
    names: Annotated[
        list[str] | None, typer.Argument(help="Variants to build (default: every shipped one, BASE+RECIPE).")
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Rebuild into a temporary folder and compare bytes with the shipped files."),
    ] = False,
) -> None:
    """Rebuild the shipped organism variants (short fine-tunes stored as weight deltas) into the package."""
    from mechscope.zoo.variants import SHIPPED, build_variants, check_variant, get_variant

    offline_by_default()
    chosen = list(names) if names else sorted(SHIPPED)
    for name in chosen:
        get_variant(name)
    if check:
        differ = {name: check_variant(name) for name in chosen}
        for name, files in differ.items():
            typer.echo(f"{name}: " + ("reproduced byte for byte" if not files else f"DIFFERS in {files}"))
        if any(differ.values()):
            raise typer.Exit(1)
        return
    for folder in build_variants(chosen):
        typer.echo(f"wrote {folder}")


@zoo_app.command("eval")
def eval_cmd(
    name: Annotated[str, typer.Argument(help="Bundled organism name or model folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the held-out splits (the card uses 0).")] = 0,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Record the measured metrics in metrics.json and re-render the card (after an eval-data change).",
        ),
    ] = False,
) -> None:
    """Recompute every planted-task metric and compare it with the recorded (model-card) value."""
    from mechscope.zoo.card import meets
    from mechscope.zoo.evaluate import TOLERANCE, compare, evaluate_folder, recorded_metrics
    from mechscope.zoo.loading import resolve_folder

    offline_by_default()
    folder = resolve_folder(name)
    measured = evaluate_folder(folder, seed)
    recorded = recorded_metrics(folder) if seed == 0 else {}
    if as_json:
        typer.echo(json.dumps(measured, indent=1))
    else:
        for metric, value in measured.items():
            card = recorded.get(metric)
            ok = meets(metric, value)
            flag = "" if ok is None else ("target met" if ok else "TARGET MISSED")
            card_s = f"card {card:.4f}" if card is not None else ""
            typer.echo(f"{metric:26s} {value:8.4f}  {card_s:12s} {flag}")
    drift = compare(recorded, measured)
    if update:
        from mechscope.zoo.evaluate import record_metrics

        if seed != 0:
            raise typer.BadParameter("the card records seed-0 metrics; drop --seed to --update", param_hint="--update")
        record_metrics(folder, measured)
        typer.echo(
            f"recorded in {folder / 'metrics.json'}; card re-rendered" + (f" (changed: {drift})" if drift else "")
        )
        return
    if drift:
        typer.echo(f"differs from the model card by more than {TOLERANCE}: {drift}", err=True)
        raise typer.Exit(1)
