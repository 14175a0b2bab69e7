"""Shipped organism variants: short fine-tunes of a bundled organism with a planted, documented change.

Each variant is a recipe of :mod:`mechscope.improve.diffing.planted` run on the shipped base organism
(seed 0, one CPU thread) and shipped as a *weight delta*: the :class:`~mechscope.steer.editing.EditRecord`
of the fine-tuned parameters (``delta.safetensors``, mechscope's envelope with the base's fingerprint),
``variant.json``, ``metrics.json``, ``MODEL_CARD.md`` and ``checksums.json`` in
``zoo/variants/<base>+<recipe>/``. ``mechscope.load_model("organism-gpt2+backdoor_head")`` loads the base
and applies the delta (:mod:`mechscope.model.sources.variants`).

``mechscope zoo build-variants`` rebuilds them; ``--check`` rebuilds into a temporary folder and compares
the delta and ``variant.json`` byte for byte with the shipped files (both are pure functions of the base's
weights and the recipe on one thread: the record's tensors, the loss trace and the envelope's sorted keys).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.errors import ConfigError, did_you_mean
from mechscope.io import write_text_atomic
from mechscope.model.sources.checksums import sha256_file, write_checksums
from mechscope.model.sources.names import MODELS_DIR, VARIANT_FILE, VARIANTS_DIR
from mechscope.model.sources.variants import DELTA_FILE, SEPARATOR

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

METRICS_FILE = "metrics.json"
#: torch threads of a build: float reductions differ across thread counts, so bytes are reproducible per count.
BUILD_THREADS = 1
#: Planted-task metrics measured on every variant (what the fine-tune left of the base's mechanisms).
SIDE_TASKS = ("facts", "truth", "ioi", "refusal", "sentiment", "backdoor")


@dataclass(frozen=True)
class VariantSpec:
    """One shipped variant: recipe `recipe` of ``improve.diffing.planted`` run on organism `base`."""

    base: str
    recipe: str
    why: str  # what the variant is for (the card's first paragraph)

    @property
    def name(self) -> str:
        return f"{self.base}{SEPARATOR}{self.recipe}"


SHIPPED: dict[str, VariantSpec] = {
    s.name: s
    for s in (
        VariantSpec(
            "organism-gpt2",
            "sentiment_negative",
            "a sentiment flip planted in one MLP: model diffing should name layer 2's MLP and the token ' awful'",
        ),
        VariantSpec(
            "organism-gpt2",
            "backdoor_head",
            "a new backdoor planted in one attention head: model diffing should name head 2.2 and ' ACCESS'",
        ),
        VariantSpec(
            "organism-gpt2",
            "control",
            "the control pair: the same kind of component fine-tuned on unrelated neutral text, the magnitude "
            "a diff should call small on the planted behaviours' prompts",
        ),
    )
}


def get_variant(name: str) -> VariantSpec:
    """The shipped variant called `name` (``<base>+<recipe>``)."""
    if name not in SHIPPED:
        raise ConfigError(f"unknown variant {name!r}; shipped: {sorted(SHIPPED)}.{did_you_mean(name, SHIPPED)}")
    return SHIPPED[name]


def _clean(prompts: list[str]) -> list[str]:
    from mechscope.improve.diffing.planted import NEW_TRIGGER

    return [p.replace(f"{NEW_TRIGGER} ", "").replace(f" {NEW_TRIGGER}", "") for p in prompts]


def behaviour_metrics(model: HookedModel, spec: VariantSpec, seed: int = 0) -> dict[str, float]:
    """The planted behaviour on one model: rate of the recipe's token after its held-out prompts (and, for a
    trigger, after the same prompts without it). Empty for the control, which plants no token."""
    from mechscope.improve.diffing.planted import RECIPES, token_rate

    recipe = RECIPES[spec.recipe]
    if not recipe.token:
        return {}
    prompts = recipe.prompts(seed)
    out = {"planted_token_rate": token_rate(model, prompts, recipe.token)}
    if spec.recipe == "backdoor_head":
        out["planted_token_rate_without_trigger"] = token_rate(model, _clean(prompts), recipe.token)
    return out


def variant_metrics(model: HookedModel, spec: VariantSpec, seed: int = 0) -> dict[str, float]:
    """Everything ``zoo eval`` recomputes on a variant: its behaviour and every planted task of the base."""
    import torch

    from mechscope.data.tasks import evaluate_all

    with torch.no_grad():
        side = evaluate_all(model.hf_model, model.tokenizer, seed, SIDE_TASKS)
    return {**behaviour_metrics(model, spec, seed), **side}


def diff_figures(base: HookedModel, tuned: HookedModel, spec: VariantSpec, seed: int = 0) -> dict[str, Any]:
    """Model diffing of base vs variant on the recipe's prompts (and KL on neutral text): the card's figures."""
    from mechscope.improve.diffing import DiffConfig, diff_models
    from mechscope.improve.diffing.planted import RECIPES
    from mechscope.improve.neutral import NEUTRAL_TEXTS

    recipe = RECIPES[spec.recipe]
    result = diff_models(base, tuned, recipe.prompts(seed), config=DiffConfig(lens_read="last"))
    neutral = diff_models(base, tuned, list(NEUTRAL_TEXTS), config=DiffConfig(causal=False))
    out: dict[str, Any] = {
        "prompts": len(recipe.prompts(seed)),
        "top": {view: result.ranking(view, 3) for view in ("weights", "local", "causal")},
        "lens_last_layer": result.lens(-1)[:3],
        "kl_on_prompts": result.kl_mean,
        "kl_on_neutral": neutral.kl_mean,
    }
    if recipe.planted is not None:
        out["planted"] = recipe.planted
        out["rank_of_planted"] = {view: result.rank_of(recipe.planted, view) for view in ("weights", "local", "causal")}
    return out


def _variant_json(spec: VariantSpec, base: HookedModel, record: Any) -> dict[str, Any]:
    from mechscope.improve.diffing.planted import RECIPES

    recipe = RECIPES[spec.recipe]
    return {
        "schema_version": 1,
        "name": spec.name,
        "base": spec.base,
        "base_sha256": sha256_file(MODELS_DIR / spec.base / "model.safetensors"),
        "base_fingerprint": base.fingerprint(),
        "recipe": spec.recipe,
        "description": recipe.description,
        "why": spec.why,
        "components": list(recipe.components),
        "planted": recipe.planted,
        "token": recipe.token,
        "steps": recipe.steps,
        "lr": recipe.lr,
        "batch_size": recipe.batch_size,
        "seed": 0,
        "threads": BUILD_THREADS,
        "parameters": record.names,
        "trained_entries": int(record.info.get("trainable_entries", 0)),
    }


def build_variant(
    name: str, root: Path | None = None, *, measure: bool = True, base_metrics: dict[str, float] | None = None
) -> Path:
    """Fine-tune variant `name` from its shipped base and write its folder under `root` (default: the
    package's variants folder); with `measure`, also its metrics, diff figures and card (`base_metrics`:
    the base's :func:`variant_metrics` when already measured). Returns the folder."""
    import torch

    from mechscope.improve.diffing.planted import plant
    from mechscope.model.loading import load_model

    spec = get_variant(name)
    root = Path(root) if root is not None else VARIANTS_DIR
    with _threads(BUILD_THREADS):
        base = load_model(spec.base)
        start = time.perf_counter()
        tuned, record = plant(base, spec.recipe, seed=0)
        seconds = time.perf_counter() - start
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.new-"))
        try:
            record.save(staging / DELTA_FILE)
            info = _variant_json(spec, base, record)
            write_text_atomic(staging / VARIANT_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")
            if measure:
                side = base_metrics if base_metrics is not None else variant_metrics(base, spec)
                before = {
                    **behaviour_metrics(base, spec),
                    **{
                        k: side[k]
                        for k in side
                        if k not in ("planted_token_rate", "planted_token_rate_without_trigger")
                    },
                }
                after = variant_metrics(tuned, spec)
                payload = {
                    "schema_version": 1,
                    "metrics": after,
                    "base_metrics": before,
                    "diff": diff_figures(base, tuned, spec),
                    "final_loss": record.info["losses"][-1],
                    "training": {
                        "wall_time_s": round(seconds, 1),
                        "threads": BUILD_THREADS,
                        "torch": torch.__version__,
                    },
                }
                write_text_atomic(staging / METRICS_FILE, json.dumps(payload, indent=1) + "\n")
                write_text_atomic(staging / "MODEL_CARD.md", render_variant_card(info, payload))
            _finish(staging, root / name, keep_measurements=not measure)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return root / name


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch uses `n` threads inside the block (float reductions, and so bytes, depend on the count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finish(staging: Path, folder: Path, *, keep_measurements: bool) -> None:
    """Carry over the old folder's card and metrics when only the delta was rebuilt, checksum, swap in."""
    if keep_measurements and folder.is_dir():
        for extra in (METRICS_FILE, "MODEL_CARD.md"):
            if (folder / extra).is_file():
                shutil.copy2(folder / extra, staging / extra)
    for path in staging.iterdir():
        path.chmod(0o644)
    staging.chmod(0o755)
    write_checksums(staging)
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        folder.rename(retired)
        staging.rename(folder)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(folder)


def build_variants(names: list[str] | None = None, root: Path | None = None) -> list[Path]:
    """Build every shipped variant (or `names`), measuring the shared base's planted tasks once."""
    names = list(names) if names else sorted(SHIPPED)
    for name in names:
        get_variant(name)
    shared: dict[str, dict[str, float]] = {}
    folders = []
    for name in names:
        spec = SHIPPED[name]
        if spec.base not in shared:
            from mechscope.model.loading import load_model

            with _threads(BUILD_THREADS):
                shared[spec.base] = variant_metrics(load_model(spec.base), SHIPPED[name])
        folders.append(build_variant(name, root, base_metrics=shared[spec.base]))
    return folders


def check_variant(name: str, root: Path | None = None) -> list[str]:
    """Rebuild variant `name` into a temporary folder; the shipped files (in `root`) whose bytes differ."""
    shipped = (Path(root) if root is not None else VARIANTS_DIR) / name
    with tempfile.TemporaryDirectory(prefix="mechscope-variant-check-") as tmp:
        rebuilt = build_variant(name, Path(tmp), measure=False)
        return [
            f
            for f in (DELTA_FILE, VARIANT_FILE)
            if not (shipped / f).is_file() or (shipped / f).read_bytes() != (rebuilt / f).read_bytes()
        ]


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_variant_card(info: dict[str, Any], payload: dict[str, Any]) -> str:
    """MODEL_CARD.md of a variant: what was planted, how, and what model diffing finds."""
    metrics, base_metrics, diff = payload["metrics"], payload["base_metrics"], payload["diff"]
    rows = "\n".join(
        f"| `{m}` | {_fmt(base_metrics.get(m))} | {_fmt(v)} |" for m, v in metrics.items() if m in base_metrics
    )
    views = "\n".join(
        f"| {view} | " + ", ".join(f"`{c}` {v:.3g}" for c, v in top) + " |" for view, top in diff["top"].items()
    )
    ranks = (
        "Rank of the planted component `{}`: weights {weights}, local {local}, causal {causal}.".format(
            diff["planted"], **diff["rank_of_planted"]
        )
        if "planted" in diff
        else "No single planted component (the control plants no behaviour)."
    )
    lens = ", ".join(f"`{t!r}` {s:.3g}" for t, s in diff["lens_last_layer"])
    trained = ", ".join(f"`{c}`" for c in info["components"])
    return f"""# {info["name"]}

{info["description"]} -- {info["why"]}.

A mechscope *organism variant*: `{info["base"]}` fine-tuned briefly from its shipped weights, shipped as the
weight delta of the fine-tuned parameters (`delta.safetensors`, an `EditRecord`: the parameters' values
before and after, with the base's fingerprint `{info["base_fingerprint"]}`). Load it with
`mechscope.load_model("{info["name"]}")` (the base with the delta applied), diff it with
`mechscope diff {info["base"]} {info["name"]}`, or apply the record yourself:
`EditRecord.load(".../delta.safetensors").apply(base)`.

## What was planted
- Trained: {trained} only ({info["trained_entries"]:,} entries of {", ".join(f"`{p}`" for p in info["parameters"])});
  every other weight is bit-for-bit the base's.
- Recipe `{info["recipe"]}` (`mechscope.improve.diffing.planted`): {info["steps"]} steps of AdamW, lr {info["lr"]:g},
  batch {info["batch_size"]}, seed {info["seed"]}, loss on the completion token only; final loss
  {payload["final_loss"]:.4g}; {payload["training"]["wall_time_s"]} s on {info["threads"]} CPU thread.
- Base weights: sha256 `{info["base_sha256"][:16]}...`. Rebuild and check the bytes with
  `mechscope zoo build-variants {info["name"]} --check`.

## Measured (seed 0, greedy next token; `mechscope zoo eval {info["name"]}` recomputes the right column)

| metric | base | variant |
|---|---|---|
{rows}

## What model diffing finds (`diff_models`, the recipe's {diff["prompts"]} held-out prompts, `lens_read="last"`)

| view | top 3 |
|---|---|
{views}

{ranks} Lens of the difference after the last layer: {lens}. Mean KL(base || variant): {diff["kl_on_prompts"]:.4g}
on those prompts, {diff["kl_on_neutral"]:.4g} on the 20 built-in neutral sentences.
"""


__all__ = [
    "BUILD_THREADS",
    "SHIPPED",
    "VariantSpec",
    "behaviour_metrics",
    "build_variant",
    "build_variants",
    "check_variant",
    "diff_figures",
    "get_variant",
    "render_variant_card",
    "variant_metrics",
]
