"""The main verbs on a real model in float16 and bfloat16 against float32 (the table in docs/scale.md).

For each half dtype the model is loaded as users load it (``load_model(name, dtype=...)``, which casts the
float32 conversion) and these figures are compared with float32's, each error norm-relative in units of the
dtype's roundoff ``u`` (bf16 ``2**-8``, fp16 ``2**-11``), and for the patching and attribution scores also as
the largest absolute error beside the largest value (they are differences of logits, so their relative
error is the logits' error over the cancellation): logits on 8 x 64 tokens of English, the logit
lens's per-layer KL, head patching effects and AtP head scores on three IOI prompts, EAP edge scores on the same,
and a mean-difference steering vector. A model whose residual stream overflows float16 raises
``NumericsError``, which is reported as such. Needs the real models: scripts/install_real_models.sh.

    .venv/bin/python scripts/measure_dtypes.py [--model smollm2-135m-instruct gemma3-270m] [--layer 9]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import typing
from typing import Any

import torch
from measure_gemma import ANSWERS, CLEAN, CORRUPT, WRONG, _docstrings  # the same IOI prompts and English text

import mechscope as ms
from mechscope.errors import NumericsError

POSITIVE = ["I love this, it is wonderful.", "What a great day, I am so happy.", "This is excellent work."]
NEGATIVE = ["I hate this, it is awful.", "What a terrible day, I am so sad.", "This is dreadful work."]
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def figures(model: Any, layer: int) -> dict[str, torch.Tensor]:
    """The compared outputs of one model, each as an fp32 tensor."""
    from mechscope.locate import activation_patch, attribution_patch, eap, logit_lens
    from mechscope.locate.attribution_patching import AtPConfig
    from mechscope.locate.metrics import logit_diff_metric
    from mechscope.locate.tuned_lens import token_windows
    from mechscope.steer import mean_difference

    first = [model.tokenizer.encode(w, add_special_tokens=False)[0] for w in ANSWERS]
    wrong = [model.tokenizer.encode(w, add_special_tokens=False)[0] for w in WRONG]
    metric = logit_diff_metric(first, wrong)
    windows = token_windows(model, _docstrings(json, pathlib, typing), seq_len=64, max_windows=8)
    with torch.no_grad():
        logits = model(windows).float()
    d = model.dims
    heads = activation_patch(model, CLEAN, CORRUPT, "heads", metric)
    return {
        "logits (8 x 64 English tokens)": logits[:, 1:],
        "logit-lens KL per layer (text tokens)": logit_lens(model, windows, k=1, batch_size=2).mean_kl().float(),
        # the effect of restoring each head (patched metric minus the corrupt run's), as users rank heads
        f"head patching effects ({d.n_layers} x {d.n_heads}), IOI": (heads["metric"] - heads["corrupt"]).float(),
        "AtP head scores, IOI": attribution_patch(model, CLEAN, CORRUPT, metric, AtPConfig(nodes=("heads",)))[
            "heads"
        ].float(),
        "EAP edge scores, IOI": eap(model, CLEAN, CORRUPT, metric)["scores"].float(),
        f"mean-difference vector, layer {layer}": mean_difference(model, POSITIVE, NEGATIVE, layers=layer)
        .directions[0]
        .float(),
    }


def compare(reference: dict[str, torch.Tensor], measured: dict[str, torch.Tensor], u: float) -> None:
    for name, ref in reference.items():
        got = measured[name]
        line = f"  {name:<42} {float((got - ref).norm() / ref.norm()) / u:7.2f} u"
        if "logits" not in name and "KL" not in name:  # small differences of logits: the absolute error too
            line += f"   max |error| {float((got - ref).abs().max()):.3g} (max |value| {float(ref.abs().max()):.3g})"
        if ref.ndim >= 2 and "logits" not in name:  # a ranking users act on: heads, edges
            top = lambda t: set(t.flatten().abs().argsort(descending=True)[:20].tolist())  # noqa: E731
            line += f"   top-20 overlap {len(top(ref) & top(got))}/20"
        if ref.ndim == 1 and ref.numel() > 100:  # a direction (or EAP's flat edge vector)
            line += f"   cosine {float(torch.nn.functional.cosine_similarity(ref, got, dim=0)):.5f}"
            if "EAP" in name:
                top = lambda t: set(t.abs().argsort(descending=True)[:20].tolist())  # noqa: E731
                line += f"   top-20 overlap {len(top(ref) & top(got))}/20"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="*", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--layer", type=int, default=9, help="layer of the steering vector")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.model:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        reference = figures(ms.load_model(name), args.layer)
        print(f"float32: {time.perf_counter() - start:.0f} s", flush=True)
        for dtype, u in UNIT.items():
            start = time.perf_counter()
            try:
                measured = figures(ms.load_model(name, dtype=dtype), args.layer)
            except NumericsError as error:
                print(f"{dtype}: NumericsError: {str(error).split('. ')[0]}", flush=True)
                continue
            print(f"{dtype}: {time.perf_counter() - start:.0f} s; error against float32 in units of u = {u:.2e}:")
            compare(reference, measured, u)


if __name__ == "__main__":
    main()
