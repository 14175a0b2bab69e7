"""Demo loop 4: features -- a sparse autoencoder on the residual stream, its feature cards, and the
effect of ablating one feature where it fires versus everywhere else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mechscope.demo.common import Section

N_TRAIN_TOKENS = 20_000
N_CARDS = 6


def _feature_ablation_kl(hm: Any, sae: Any, feature: int, texts: list[str]) -> tuple[float, float, float]:
    """Mean next-token KL(clean || feature clamped to 0) where the feature fires and where it does not,
    and the share of tokens where it fires (over the positions the clamp acts on: not each row's first)."""
    from mechscope.features.evals import default_unspliced
    from mechscope.features.store import token_rows
    from mechscope.steer.clamp import clamp_features

    rows = token_rows(hm, texts, 64)[:32]
    site = hm.site(sae.config.site)
    logits, cache = hm.run_with_cache(rows, [site])
    kept = default_unspliced(hm)
    active = sae.encode(cache[site.name][:, kept:])[..., feature] > 0  # [rows, pos]
    with clamp_features(hm, sae, {feature: 0.0}):
        ablated = hm(rows)
    logp, logq = torch.log_softmax(logits[:, kept:].float(), -1), torch.log_softmax(ablated[:, kept:].float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [rows, pos]
    on = float(kl[active].mean()) if active.any() else float("nan")
    return on, float(kl[~active].mean()), float(active.float().mean())


def run(hm: Any, *, seed: int = 0, echo: Callable[[str], Any]) -> Section:
    from mechscope.features import (
        SAEConfig,
        SAETrainConfig,
        collect_activations,
        downstream_loss,
        feature_cards,
        reconstruction_metrics,
        train_sae,
    )
    from mechscope.steer.editing.stats import zoo_texts

    section = Section()
    texts = list(zoo_texts(seed))
    train_texts, held = texts[: len(texts) - 600], texts[-600:]
    layer = max(0, hm.dims.n_layers // 2 - 1)
    site = f"blocks.{layer}.hook_resid_post"
    d = hm.dims.d_model
    acts = collect_activations(hm, site, train_texts, max_tokens=N_TRAIN_TOKENS)
    config = SAEConfig(d_in=d, d_sae=2 * d, activation="topk", k=16, site=site)
    sae, _ = train_sae(acts, config, SAETrainConfig(steps=600, batch_size=256, lr=2e-3, seed=seed))
    quality = reconstruction_metrics(sae, collect_activations(hm, site, held, max_tokens=5_000))
    loss = downstream_loss(hm, sae, held, max_rows=32)
    echo(
        f"Locate: a top-16 SAE with {2 * d} features at {site}: explained variance "
        f"{quality['explained_variance']:.3f}, loss recovered {loss['loss_recovered']:.3f}"
    )
    cards = feature_cards(hm, sae, held, top_k=3, context=6, n_logits=5, max_rows=128)
    shown = sorted(cards, key=lambda c: -c.max_activation)[:N_CARDS]
    strongest = shown[0].feature
    on, off, share = _feature_ablation_kl(hm, sae, strongest, held)
    echo(
        f"Steer: ablating feature {strongest} moves next-token predictions where it fires (KL {on:.3f}, "
        f"{share:.1%} of tokens) and hardly elsewhere (KL {off:.4f})"
    )
    section.metrics = {
        "site": site,
        "d_sae": config.d_sae,
        "reconstruction": quality,
        "downstream": loss,
        "ablated_feature": strongest,
        "ablation_kl_where_active": on,
        "ablation_kl_elsewhere": off,
        "active_share": share,
    }
    section.add("section", "4. Features: a sparse autoencoder, its feature cards, and one feature ablated")
    section.add(
        "text",
        f"Locate. A sparse autoencoder (top-16, {config.d_sae} features) trained on {acts.shape[0]} tokens of "
        f"{site} reconstructs held-out activations with explained variance {quality['explained_variance']:.3f}; "
        f"spliced into the model in place of the site it keeps {loss['loss_recovered']:.1%} of the loss that "
        f"zero-ablating the site costs (cross-entropy {loss['ce_clean']:.3f} clean, {loss['ce_spliced']:.3f} "
        f"spliced, {loss['ce_zero_ablated']:.3f} ablated). The features with the largest activations on "
        "held-out text, with where they fire most ([[ ]] marks the token) and the tokens their decoder "
        "directions promote:",
    )
    rows = []
    for card in shown:
        best = card.top_contexts[0] if card.top_contexts else None
        where = (
            "" if best is None else "".join(best["tokens"][: best["active"]]) + f"[[{best['tokens'][best['active']]}]]"
        )
        promoted = ", ".join(repr(t) for t, _ in card.promoted[:5])
        rows.append([str(card.feature), f"{card.frequency:.2%}", f"{card.max_activation:.1f}", where, promoted])
    section.add("table", (["feature", "fires on", "max", "strongest context", "promotes"], rows))
    section.add(
        "text",
        f"Steer and measure. Clamping feature {strongest} to 0 (the reconstruction error kept, so only this "
        f"feature changes) moves the next-token distribution by KL {on:.3f} nats on the {share:.1%} of tokens "
        f"where it fires, and by {off:.4f} elsewhere.",
    )
    return section


__all__ = ["run"]
