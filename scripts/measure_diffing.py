"""Measure model diffing, transfer, profiles, conditional steering and trait vectors on the organisms
(the figures of docs/diffing.md).

Run:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        flock /tmp/mechscope-heavy.lock .venv/bin/python scripts/measure_diffing.py --out diffing-figures

Writes ``<out>/metrics.json`` (every number) and ``<out>/*.html`` figures; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

import mechscope as ms
from mechscope.data.contrasts import contrast_texts, retain_texts
from mechscope.data.tasks import vocab
from mechscope.improve.diffing import DiffConfig, diff_models
from mechscope.improve.diffing.planted import RECIPES, plant, token_rate
from mechscope.improve.neutral import NEUTRAL_TEXTS
from mechscope.improve.transfer import MapConfig, learn_map, transfer_effect
from mechscope.model.hooked import HookedModel
from mechscope.report.html import write_figure
from mechscope.sites import Site
from mechscope.steer import mean_difference, steer
from mechscope.steer.compose import profile_interaction, steering_profile
from mechscope.steer.conditional import Condition, calibrate_threshold, conditional
from mechscope.steer.traits import trait_report, trait_vector
from mechscope.steer.vectors import read_activations


def review(rng: random.Random, n_negative: int, item: str | None = None) -> str:
    item = item or rng.choice(vocab.REVIEW_ITEMS)
    sentences = rng.sample(vocab.NEGATIVE_SENTENCES, n_negative) + rng.sample(vocab.POSITIVE_SENTENCES, 3 - n_negative)
    rng.shuffle(sentences)
    return f"Review of the {item}: {' '.join(s.format(item=item) for s in sentences)} Overall, it was"


def negativity(model: HookedModel) -> Any:
    awful, great = model.to_single_token(" awful"), model.to_single_token(" great")

    def metric(logits: torch.Tensor) -> torch.Tensor:
        lp = logits[:, -1].float().log_softmax(-1)
        return lp[:, awful] - lp[:, great]

    return metric


def pairs(base: HookedModel, out: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, recipe in RECIPES.items():
        t0 = time.time()
        tuned, record = plant(base, name)
        seconds = time.time() - t0
        prompts = recipe.prompts(0)
        result = diff_models(base, tuned, prompts, config=DiffConfig(lens_read="last"))
        neutral = diff_models(base, tuned, NEUTRAL_TEXTS, config=DiffConfig(causal=False))
        write_figure(result.plot(title=f"organism-gpt2 vs {name}"), out / f"diff_{name}.html")
        row: dict[str, Any] = {
            "description": recipe.description,
            "finetune_seconds": round(seconds, 1),
            "final_loss": record.info["losses"][-1],
            "kl_planted_prompts": result.kl_mean,
            "kl_neutral": neutral.kl_mean,
            "top": {v: result.ranking(v, 3) for v in ("weights", "local", "causal")},
            "lens_last_layer": result.lens(-1)[:5],
        }
        if recipe.token:
            row["token_rate"] = [token_rate(base, prompts, recipe.token), token_rate(tuned, prompts, recipe.token)]
            tokens = [t for t, _ in result.lens(-1)]
            row["lens_rank_of_token"] = 1 + tokens.index(recipe.token) if recipe.token in tokens else None
        if recipe.planted:
            row["rank_of_planted"] = {v: result.rank_of(recipe.planted, v) for v in ("weights", "local", "causal")}
        rows[name] = row
        print(f"{name}: {json.dumps(row, default=str)[:400]}", flush=True)
    itself = diff_models(base, base, RECIPES["sentiment_negative"].prompts(0))
    rows["self"] = {
        "kl_planted_prompts": itself.kl_mean,
        "max_weight_rel": float(itself["weight_rel"].abs().max()),
        "max_local": float(itself["local_rel"].abs().max()),
        "max_causal": float(itself["causal_effect"].abs().max()),
    }
    return rows


def transfer(base: HookedModel, out: Path) -> dict[str, Any]:
    rng = random.Random(1)
    llama = ms.load_model("organism-llama")
    positive, negative = contrast_texts("sentiment", n=32)
    texts = retain_texts(48) + positive[:16] + negative[:16]
    prompts = [review(rng, k) for k in (0, 1, 2, 3) for _ in range(8)]
    results: dict[str, Any] = {}
    targets = {"organism-llama": llama}
    for name in ("sentiment_negative", "control"):
        targets[f"organism-gpt2+{name}"] = plant(base, name)[0]
    for tname, target in targets.items():
        for layer in (1, 2, 3):
            site = f"blocks.{layer}.hook_resid_pre"
            rmap = learn_map(base, target, texts, MapConfig(source_site=site, target_site=site), heldout=prompts)
            res = transfer_effect(base, target, rmap, positive, negative, prompts, negativity(target), coefficient=1.0)
            results[f"{tname} L{layer}"] = {
                "effect_ratio": res.ratio,
                "cosine": float(res["cosine"]),
                "effect_native": float(res["effect"][0]),
                "effect_transferred": float(res["effect"][1]),
                "effect_source": float(res["effect"][2]),
                "r2_train": rmap.fit["r2_train"],
                "r2_heldout": rmap.fit.get("r2_heldout"),
            }
            print(tname, layer, json.dumps(results[f"{tname} L{layer}"]), flush=True)
    return results


def trait(base: HookedModel) -> dict[str, Any]:
    rng = random.Random(2)
    vec = trait_vector(base, [review(rng, 3) for _ in range(16)], [review(rng, 0) for _ in range(16)], layer=2)
    mixed = [review(rng, k) for k in (0, 1, 2, 3) for _ in range(8)]
    metric = negativity(base)

    def expression(model: HookedModel, prompts: list[str]) -> torch.Tensor:
        return metric(model.forward(model.to_tokens(prompts, padding_side="left")))

    res = trait_report(base, vec, mixed, expression, coefficients=(-1.0, -0.5, 0.0, 0.5, 1.0), positions=[-1])
    return {"correlation": res.correlation, "steered": res["steered"].tolist(), "n_prompts": len(mixed)}


def profile(base: HookedModel) -> dict[str, Any]:
    pos, neg = contrast_texts("sentiment", n=32)
    ref_pos, ref_neg = contrast_texts("refusal", n=32)
    sentiment = mean_difference(base, pos, neg, layers=2)
    refusal = mean_difference(base, ref_pos, ref_neg, layers=2)
    out: dict[str, Any] = {}
    texts = retain_texts(8)
    for scale in (0.1, 0.5):
        prof = steering_profile(base, {"negativity": (sentiment, scale), "refusal": (refusal, scale)})
        res = profile_interaction(prof, texts)
        out[f"x{scale}"] = {"interaction": float(res["interaction"]), "effect_norm": res["effect_norm"].tolist()}
    return out


def gated(base: HookedModel) -> dict[str, Any]:
    rng = random.Random(3)
    items = [i for i in vocab.REVIEW_ITEMS if i != "film"]
    film = [review(rng, 0, "film") for _ in range(16)]
    other = [review(rng, 0, rng.choice(items)) for _ in range(16)]
    site = Site("hook_resid_pre", 1)
    acts_f = read_activations(base, film[:8], [site], read="mean")[site]
    acts_o = read_activations(base, other[:8], [site], read="mean")[site]
    direction = acts_f.mean(0) - acts_o.mean(0)
    cond = calibrate_threshold(base, Condition(site.name, direction, read="mean"), film[:8], other[:8])
    pos, neg = contrast_texts("sentiment", n=32)
    vec = mean_difference(base, pos, neg, layers=2)
    awful = base.to_single_token(" awful")
    test = film[8:] + other[8:]
    batch = base.to_tokens(test, padding_side="left")
    with torch.no_grad():
        plain = base.forward(batch)[:, -1]
        with conditional(steer(base, vec, 1.0), cond) as c:
            out = base.forward(batch)[:, -1]
            assert c.gate is not None  # decided on this prompt forward
            gate = c.gate.tolist()
    is_film = torch.tensor([True] * 8 + [False] * 8)
    flipped = out.argmax(-1) == awful
    open_ = torch.tensor(gate)
    return {
        "gate_on_film": sum(gate[:8]) / 8,
        "gate_on_other": sum(gate[8:]) / 8,
        "flip_rate_film": float(flipped[is_film].float().mean()),
        "flip_rate_other": float(flipped[~is_film].float().mean()),
        "max_logit_change_where_gate_closed": float((out[~open_] - plain[~open_]).abs().max()),
        "flip_rate_where_gate_open": float(flipped[open_].float().mean()),
    }


def circuits(base: HookedModel, out: Path) -> dict[str, Any]:
    from mechscope.improve.compare import compare_circuits
    from mechscope.locate.metrics import logit_diff

    llama = ms.load_model("organism-llama")
    rng = random.Random(0)
    template = "When {a} and {b} went to the {place}, {s} gave a {obj} to"
    clean: list[str] = []
    corrupt: list[str] = []
    io: list[int] = []
    subj: list[int] = []
    while len(clean) < 16:
        a, b, c = rng.sample(vocab.IOI_NAMES, 3)
        place, obj = rng.choice(vocab.IOI_PLACES), rng.choice(vocab.IOI_OBJECTS)
        x, y = (template.format(a=a, b=b, s=s, place=place, obj=obj) for s in (b, c))
        if len({len(base.to_tokens(t)["input_ids"][0]) for t in [x, y, *clean[:1]]}) != 1:
            continue
        clean.append(x)
        corrupt.append(y)
        io.append(base.to_single_token(" " + a))
        subj.append(base.to_single_token(" " + b))

    def metric(i: int) -> Any:
        return lambda logits: logit_diff(logits, io[i], subj[i])

    res = compare_circuits(
        base, llama, clean, corrupt, metric, metric, top=6, names=("organism-gpt2", "organism-llama")
    )
    write_figure(res.plot(), out / "circuits_gpt2_vs_llama.html")
    return {"matches": res.matches, "n_prompts": len(clean)}


def harmful_heads(base: HookedModel) -> dict[str, Any]:
    from mechscope.data.tasks import backdoor
    from mechscope.improve import EvaluationConfig, ZooTask, evaluate
    from mechscope.improve.head_removal import HeadRemovalConfig, find_harmful_heads

    data = backdoor.generate(0)
    harmful = [e.prompt for e in data.eval["triggered"]][::4][:32]
    reference = [e.prompt for e in data.eval["clean"]][::4][:32]
    access = base.to_single_token(" " + vocab.BACKDOOR_WORD)

    def payload_rate(model: HookedModel, prompts: list[str]) -> float:
        logits = model.forward(model.to_tokens(prompts, padding_side="left"))[:, -1]
        return float((logits.argmax(-1) == access).float().mean())

    res = find_harmful_heads(base, harmful, reference, payload_rate, HeadRemovalConfig(target=0.1, max_heads=10))
    sides = ("refusal", "sentiment", "ioi", "facts")
    ev = evaluate(base, res.intervention(base, reference), ZooTask(task="backdoor"), EvaluationConfig(side_tasks=sides))
    return {
        "heads": res.heads,
        "scores": res.config["scores"],
        "curve": res["curve"].tolist(),
        "top_single": sorted(
            (
                (f"L{i // base.dims.n_heads}H{i % base.dims.n_heads}", float(v))
                for i, v in enumerate(res["single_effect"].flatten())
            ),
            key=lambda x: -x[1],
        )[:5],
        "evaluation": {m: [ev.before(m), ev.after(m)] for m in ev.metrics},
    }


def harmful_heads_planted(base: HookedModel) -> dict[str, Any]:
    """Head removal on the backdoor_head pair: one head of the tuned organism carries a new trigger."""
    from mechscope.improve import EvaluationConfig, Task, evaluate
    from mechscope.improve.diffing.planted import NEW_TRIGGER
    from mechscope.improve.head_removal import HeadRemovalConfig, find_harmful_heads

    tuned, _ = plant(base, "backdoor_head")
    harmful = RECIPES["backdoor_head"].prompts(0)
    reference = [p.replace(f"{NEW_TRIGGER} ", "").replace(f" {NEW_TRIGGER}", "") for p in harmful]

    def payload_rate(model: HookedModel, prompts: list[str]) -> float:
        return token_rate(model, prompts, " ACCESS")

    class NewTrigger(Task):
        name = "new_trigger"

        def metrics(self, model: HookedModel) -> dict[str, float]:
            return {
                "payload_new_trigger": payload_rate(model, harmful),
                "payload_clean": payload_rate(model, reference),
            }

        def sample_prompts(self) -> list[str]:
            return harmful[:2]

    res = find_harmful_heads(tuned, harmful, reference, payload_rate, HeadRemovalConfig(target=0.1, max_heads=6))
    sides = ("backdoor", "refusal", "sentiment", "ioi", "facts")
    ev = evaluate(tuned, res.intervention(tuned, reference), NewTrigger(), EvaluationConfig(side_tasks=sides))
    n_heads = tuned.dims.n_heads
    single = res["single_effect"].flatten()
    return {
        "heads": res.heads,
        "scores": res.config["scores"],
        "curve": res["curve"].tolist(),
        "top_single": [
            (f"L{i // n_heads}H{i % n_heads}", float(single[i])) for i in single.argsort(descending=True)[:4]
        ],
        "evaluation": {m: [ev.before(m), ev.after(m)] for m in ev.metrics},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("diffing-figures"))
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    base = ms.load_model("organism-gpt2")
    sections = {"pairs": lambda: pairs(base, args.out), "transfer": lambda: transfer(base, args.out)}
    sections |= {
        "circuits": lambda: circuits(base, args.out),
        "trait": lambda: trait(base),
        "profile": lambda: profile(base),
        "conditional": lambda: gated(base),
        "harmful_heads": lambda: harmful_heads(base),
        "harmful_heads_planted": lambda: harmful_heads_planted(base),
    }
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        metrics[name] = fn()
        metrics[name + "_seconds"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(metrics, indent=1, default=str))
        print(
            f"== {name} ({metrics[name + '_seconds']} s)\n{json.dumps(metrics[name], indent=1, default=str)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
