"""Integrated-gradients completeness against steps (issue 21.2): the figures in docs/locate-lenses-probes-heads.md.

    python scripts/measure_ig_convergence.py tiny       # every tiny test family: former vs current defaults
    python scripts/measure_ig_convergence.py path       # SmolLM2: the metric along the zero and mean paths
    python scripts/measure_ig_convergence.py smollm2    # SmolLM2: error at 16/32/64/128 steps per baseline/rule

The SmolLM2 modes are heavy: run them under the shared lock (`flock /tmp/mechscope-heavy.lock ...`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from mechscope.locate.attribution import IGConfig, _forward_with, _site_activation, integrated_gradients, logit_metric

PROMPT, GOOD, BAD = "The capital of Germany is", " Berlin", " Paris"


def tiny() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mechscope.model.hooked import HookedModel
    from tiny_models import FAMILIES, tiny_model

    torch.set_num_threads(1)
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    print("| family | former (zero, gauss_legendre): 8 / 32 / 128 steps | now (mean, adaptive) |")
    for fam in FAMILIES:
        hm = HookedModel(tiny_model(fam, with_tokenizer=False)[0])
        zeros = torch.zeros(2, 6, hm.dims.d_model)
        metric = logit_metric(5, 7)
        old = [
            float(
                integrated_gradients(hm, ids, metric, baseline=zeros, config=IGConfig(steps=s, rule="gauss_legendre"))[
                    "error"
                ]
                .abs()
                .max()
            )
            for s in (8, 32, 128)
        ]
        new = [
            float(integrated_gradients(hm, ids, metric, config=IGConfig(steps=s))["error"].abs().max())
            for s in (8, 32, 128)
        ]
        print(f"| {fam} | {' / '.join(f'{e:.1e}' for e in old)} | {' / '.join(f'{e:.1e}' for e in new)} |", flush=True)


def path() -> None:
    from mechscope import load_model

    hm = load_model("smollm2-135m-instruct")
    good, bad = hm.to_single_token(GOOD), hm.to_single_token(BAD)
    batch = hm.prepare_inputs(PROMPT)
    site = hm.site("hook_embed")
    x = _site_activation(hm, batch, site)

    def f(alphas: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(alphas), 64):
            a = alphas[i : i + 64]
            p = (base[None] + a.view(-1, 1, 1, 1) * (x - base)[None]).reshape(len(a), *x.shape[1:])
            big = {k: v.repeat(len(a), *([1] * (v.ndim - 1))) for k, v in batch.items()}
            with torch.no_grad():
                lg = _forward_with(hm, big, site, p)
            out.append((lg[:, -1, good] - lg[:, -1, bad]).float())
        return torch.cat(out)

    alphas = torch.linspace(0, 1, 4001)
    for name, base in (("zero", torch.zeros_like(x)), ("mean", x.mean(1, keepdim=True).expand_as(x))):
        values = f(alphas, base)
        steps = values.diff()
        i = int(steps.abs().argmax())
        print(
            f"{name}: f(0) {float(values[0]):.3f}, f(1) {float(values[-1]):.3f}, total variation "
            f"{float(steps.abs().sum()):.1f}; largest jump {float(steps[i]):+.3f} at alpha {float(alphas[i]):.5f}"
        )


def smollm2() -> None:
    from mechscope import load_model

    torch.set_num_threads(2)
    hm = load_model("smollm2-135m-instruct")
    metric = logit_metric(hm.to_single_token(GOOD), hm.to_single_token(BAD))
    _, cache = hm.run_with_cache(PROMPT, ["hook_embed"])
    zeros = torch.zeros_like(cache["hook_embed"])
    rows = [
        ("zero (former default), gauss_legendre", zeros, "gauss_legendre"),
        ("zero, adaptive", zeros, "adaptive"),
        ("mean, gauss_legendre", "mean", "gauss_legendre"),
        ("mean, adaptive (default)", "mean", "adaptive"),
        ("pad, adaptive", "pad", "adaptive"),
    ]
    print("| baseline, rule | f(x) - f(x') | 16 | 32 | 64 | 128 steps | time |")
    for label, baseline, rule in rows:
        errors, start = [], time.time()
        for steps in (16, 32, 64, 128):
            cfg = IGConfig(steps=steps, rule=rule)  # type: ignore[arg-type]
            r = integrated_gradients(hm, PROMPT, metric, baseline=baseline, config=cfg)  # type: ignore[arg-type]
            errors.append(float(r["error"][0]))
        cells = " | ".join(f"{e:+.2e}" for e in errors)
        print(f"| {label} | {float(r['delta'][0]):.3f} | {cells} | {time.time() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    modes = {"tiny": tiny, "path": path, "smollm2": smollm2}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[1]]()
