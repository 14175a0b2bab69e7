"""detect_heads on SmolLM2-135M-Instruct: the copying scores as shipped (only the 200 candidate columns
of the unembedding, all heads of a layer at once, eigenvalues through a rank d_head + 8 basis) against
the previous implementation (every head's OV output through the full 49k-token unembedding, then 200
columns kept, and a full 200 x 200 eigendecomposition per head) and against the intermediate step (kept
columns, full eigendecomposition), measured in the same run, one after the other.

    python benchmarks/bench_detect_heads.py [--model smollm2-135m-instruct] [--threads 2]

Prints the time of the attention detectors, of both copying-score implementations, of the whole
detect_heads before and after, the ratio, and the largest score difference between them.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from mechscope.locate.heads import (
    HeadDetectorConfig,
    _attention_scores,
    copying_scores,
    ordinary_token_range,
    repeated_tokens,
)
from mechscope.model.loading import load_model


def copying_full_unembed(model, *, top_k: int, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The implementation before issue 21: one head at a time, logits over the whole vocabulary."""
    d, a = model.dims, model.adapter
    lo, hi = ordinary_token_range(model)
    cand = torch.randperm(hi - lo, generator=torch.Generator().manual_seed(seed))[: min(n, hi - lo)] + lo
    w_e = model.weights.W_E[cand.to(model.device)]
    rate, eigen = torch.zeros(d.n_layers, d.n_heads), torch.zeros(d.n_layers, d.n_heads)
    unembed, final_norm = model.module(a.unembed), model.module(a.final_norm)
    with torch.no_grad():
        for layer in range(d.n_layers):
            x = model.layer_module(layer, a.ln1)(w_e) if a.ln1 is not None else w_e
            w_v = model.weights.W_V_layer(layer)
            b_v = model.weights._expand(model.weights.qkv(layer)[5])
            w_o = model.weights.W_O_layer(layer)
            for h in range(d.n_heads):
                out = (x @ w_v[h] + b_v[h]) @ w_o[h]
                if a.post_attn_norm is not None:
                    out = model.layer_module(layer, a.post_attn_norm)(out)
                logits = unembed(final_norm(out))[:, cand.to(model.device)].float()
                own = logits.diagonal()
                rate[layer, h] = ((logits > own[:, None]).sum(-1) < top_k).float().mean()
                lam = torch.linalg.eigvals(logits.double())
                eigen[layer, h] = float(lam.real.sum() / lam.abs().sum().clamp_min(1e-12))
    return rate, eigen


def copying_kept_columns_full_eig(model, *, top_k: int, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns, all heads at once, but the full n x n eigendecomposition per head."""
    d, a = model.dims, model.adapter
    lo, hi = ordinary_token_range(model)
    cand = torch.randperm(hi - lo, generator=torch.Generator().manual_seed(seed))[: min(n, hi - lo)] + lo
    w_e, w_u, b_u = model.weights.W_E[cand], model.weights.W_U[:, cand], model.weights.b_U[cand]
    rate, eigen = torch.zeros(d.n_layers, d.n_heads), torch.zeros(d.n_layers, d.n_heads)
    final_norm = model.module(a.final_norm)
    with torch.no_grad():
        for layer in range(d.n_layers):
            x = model.layer_module(layer, a.ln1)(w_e) if a.ln1 is not None else w_e
            b_v = model.weights._expand(model.weights.qkv(layer)[5])
            out = torch.einsum("nd,hde->hne", x, model.weights.W_V_layer(layer)) + b_v[:, None]
            out = torch.einsum("hne,hed->hnd", out, model.weights.W_O_layer(layer))
            if a.post_attn_norm is not None:
                out = model.layer_module(layer, a.post_attn_norm)(out)
            logits = (final_norm(out) @ w_u + b_u).float()
            rank = (logits > logits.diagonal(dim1=-2, dim2=-1)[..., None]).sum(-1)
            rate[layer] = (rank < top_k).float().mean(-1)
            lam = torch.linalg.eigvals(logits.double())
            eigen[layer] = (lam.real.sum(-1) / lam.abs().sum(-1).clamp_min(1e-12)).float()
    return rate, eigen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the two fast variants (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    cfg = HeadDetectorConfig()
    batch = model.prepare_inputs(repeated_tokens(model, n=cfg.n_sequences, half_len=cfg.half_len, seed=cfg.seed))
    d = model.dims
    print(f"{args.model}: {d.n_layers} layers x {d.n_heads} heads, vocab {d.d_vocab}; {args.threads} thread(s)")
    kw: dict[str, Any] = {"top_k": cfg.copy_top_k, "seed": cfg.seed, "n": cfg.n_copy_tokens}

    def timed(fn: Any) -> tuple[float, Any]:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    # Warm-up (kernels, allocator), then the cheap variants in interleaved rounds (best of `repeats`,
    # the machine is shared) and the former code once.
    copying_scores(model, tokens=torch.arange(1000, 1100), top_k=cfg.copy_top_k)
    attention, _ = timed(lambda: _attention_scores(model, batch, cfg.seed))
    news, mids = [], []
    for _ in range(args.repeats):
        t_new, (new_rate, new_eigen) = timed(lambda: copying_scores(model, **kw))
        t_mid, (mid_rate, mid_eigen) = timed(lambda: copying_kept_columns_full_eig(model, **kw))
        news.append(t_new)
        mids.append(t_mid)
    new, mid = min(news), min(mids)
    old, (old_rate, old_eigen) = timed(lambda: copying_full_unembed(model, **kw))
    print(f"rounds: shipped {[round(t, 1) for t in news]} s, intermediate {[round(t, 1) for t in mids]} s")
    print(f"attention detectors (both versions)     {attention:8.1f} s")
    print(f"copying scores, full unembedding (old)  {old:8.1f} s")
    print(f"copying scores, kept columns, full eig  {mid:8.1f} s")
    print(f"copying scores, as shipped (new)        {new:8.1f} s")
    print(f"detect_heads old / new                  {attention + old:8.1f} s / {attention + new:.1f} s")
    print(f"ratio old / new                         {(attention + old) / (attention + new):8.1f}x")
    print(
        f"max |difference| new vs old: copying {float((new_rate - old_rate).abs().max()):.4f}, "
        f"eigen {float((new_eigen - old_eigen).abs().max()):.2e} (intermediate vs old: "
        f"{float((mid_rate - old_rate).abs().max()):.4f}, {float((mid_eigen - old_eigen).abs().max()):.2e})"
    )


if __name__ == "__main__":
    main()
