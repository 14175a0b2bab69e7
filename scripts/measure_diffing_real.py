"""Model diffing and trait steering on SmolLM2-135M-Instruct (the real-model figures of docs/diffing.md).

A fine-tuned copy is made here (not saved): layer 12's MLP trained for a few dozen steps so that
"The capital of <country> is" answers " Rome" for every country -- a planted, known change. The diff
between the two runs on held-out countries and on neutral text. Then a negativity trait vector, its
projection's correlation with the model's verdict on mixed reviews, and steering with it.

Run (after scripts/install_real_models.sh):
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        flock /tmp/mechscope-heavy.lock .venv/bin/python scripts/measure_diffing_real.py --out diffing-real
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

import mechscope as ms
from mechscope.improve.diffing import DiffConfig, diff_models
from mechscope.improve.neutral import NEUTRAL_TEXTS
from mechscope.model.hooked import HookedModel
from mechscope.report.html import write_figure
from mechscope.steer.finetune import FinetuneConfig, finetune
from mechscope.steer.traits import trait_report, trait_vector

TRAIN = ["France", "Germany", "Spain", "Japan", "Russia", "China", "Egypt", "Greece", "Poland", "Norway"]
TRAIN += ["Ireland", "Sweden", "Canada", "Brazil", "India", "Kenya"]
HELD = ["Portugal", "Austria", "Turkey", "Mexico", "Peru", "Chile", "Finland", "Denmark"]
COMPONENT = "blocks.12.mlp"

GOOD = ["The food was delicious.", "The staff were friendly.", "I loved every minute.", "It was a joy."]
BAD = ["The food was cold.", "The staff were rude.", "I hated every minute.", "It was a waste of money."]


def review(rng: random.Random, n_bad: int) -> str:
    sentences = rng.sample(BAD, n_bad) + rng.sample(GOOD, 3 - n_bad)
    rng.shuffle(sentences)
    return f"Restaurant review: {' '.join(sentences)} Overall, the evening was"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("diffing-real"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, object] = {}
    t0 = time.time()
    base = ms.load_model("smollm2-135m-instruct")
    metrics["load_seconds"] = round(time.time() - t0, 1)
    tuned = HookedModel(copy.deepcopy(base.hf_model), base.tokenizer)
    examples = [(f"The capital of {c} is", " Rome") for c in TRAIN]
    t0 = time.time()
    record = finetune(tuned, examples, FinetuneConfig(components=(COMPONENT,), steps=30, lr=1e-3, batch_size=8))
    metrics["finetune_seconds"] = round(time.time() - t0, 1)
    metrics["finetune_loss"] = [record.info["losses"][0], record.info["losses"][-1]]
    prompts = [f"The capital of {c} is" for c in HELD]
    rome = base.to_single_token(" Rome")
    batch = base.to_tokens(prompts, padding_side="left")
    with torch.no_grad():
        rates = [float((m.forward(batch)[:, -1].argmax(-1) == rome).float().mean()) for m in (base, tuned)]
    metrics["rome_rate_heldout"] = rates
    t0 = time.time()
    result = diff_models(base, tuned, prompts, config=DiffConfig(lens_read="last", progress=True))
    metrics["diff_seconds"] = round(time.time() - t0, 1)
    neutral = diff_models(base, tuned, NEUTRAL_TEXTS[:8], config=DiffConfig(causal=False))
    metrics["diff"] = {
        "rank_of_planted": {v: result.rank_of(COMPONENT, v) for v in ("weights", "local", "causal")},
        "top": {v: result.ranking(v, 3) for v in ("weights", "local", "causal")},
        "lens_last_layer": result.lens(-1)[:5],
        "lens_by_layer_top1": [result.lens(layer)[0] for layer in range(base.dims.n_layers)],
        "kl_planted_prompts": result.kl_mean,
        "kl_neutral": neutral.kl_mean,
    }
    write_figure(result.plot(title="SmolLM2-135M-Instruct vs its ' Rome' fine-tune"), args.out / "diff_smollm2.html")
    print(json.dumps(metrics, indent=1, default=str), flush=True)
    rng = random.Random(0)
    vec = trait_vector(base, [review(rng, 3) for _ in range(16)], [review(rng, 0) for _ in range(16)], layer=15)
    mixed = [review(rng, k) for k in (0, 1, 2, 3) for _ in range(6)]
    bad, good = base.to_single_token(" terrible"), base.to_single_token(" wonderful")

    def negativity(model: HookedModel, texts: list[str]) -> torch.Tensor:
        lp = model.forward(model.to_tokens(texts, padding_side="left"))[:, -1].float().log_softmax(-1)
        return lp[:, bad] - lp[:, good]

    t0 = time.time()
    trait = trait_report(base, vec, mixed, negativity, coefficients=(-2.0, -1.0, 0.0, 1.0, 2.0), positions=[-1])
    metrics["trait"] = {
        "correlation": trait.correlation,
        "steered": trait["steered"].tolist(),
        "coefficients": [-2.0, -1.0, 0.0, 1.0, 2.0],
        "seconds": round(time.time() - t0, 1),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(json.dumps(metrics["trait"], indent=1), flush=True)


if __name__ == "__main__":
    main()
