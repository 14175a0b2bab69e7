"""Demo loop 1: the refusal direction -- locate it, ablate it (hooks and weights), measure what changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mechscope.demo.common import Section, markdown_rows, rates_figure


def run(hm: Any, *, seed: int = 0, echo: Callable[[str], Any]) -> Section:
    from mechscope.data.contrasts import contrast_texts, retain_texts
    from mechscope.data.tasks import vocab
    from mechscope.improve import EvaluationConfig, RefusalTask, evaluate
    from mechscope.steer import (
        DirectionSelectionConfig,
        directional_ablation,
        logodds_bar,
        orthogonalize,
        select_direction,
        token_logodds,
    )

    section = Section()
    forbidden, benign = contrast_texts("refusal", n=48, seed=seed)
    refusal_token = hm.to_single_token(" " + vocab.REFUSAL_WORD)
    # Arditi et al.'s filters, preferring candidates that also induce refusal when added; among those
    # that remove refusal (mean refusal log-odds under ablation at most that of a 10 % probability), the
    # one with the least KL on ordinary prompts wins. Where no single direction does, the span of the
    # best few candidates (up to 4) is ablated instead.
    config = DirectionSelectionConfig(
        positions=(-1, -2, -3, -4, -5), require_induction="prefer", max_ablation_score=logodds_bar(0.1), max_rank=4
    )
    selection = select_direction(
        hm, forbidden, benign, token_logodds(refusal_token), config, retain=retain_texts(32, seed=seed)
    )
    layer, position = selection.chosen
    direction = selection.direction(hm)
    members = selection.describe_members()
    found = "direction" if direction.rank == 1 else f"subspace of rank {direction.rank} (spanned by candidates at"
    where = members if direction.rank == 1 else members + ")"
    echo(f"Locate: refusal {found} {where} (of {len(forbidden)}+{len(benign)} prompts)")

    result = evaluate(hm, directional_ablation(hm, direction), RefusalTask(seed=seed), EvaluationConfig(seed=seed))
    before, after = result.before("refusal_forbidden"), result.after("refusal_forbidden")
    echo(
        f"Steer: directional ablation: refusal on held-out forbidden requests {before:.2f} -> {after:.2f}; "
        f"benign {result.before('refusal_benign'):.2f} -> {result.after('refusal_benign'):.2f}; "
        f"neutral-text KL {result.after('kl_neutral'):.4f}"
    )

    ortho = orthogonalize(hm, direction)
    probe = hm.to_tokens(forbidden[:8] + benign[:8])
    with directional_ablation(hm, direction):
        hooked_logits = hm.forward(probe)
    ortho_logits = ortho.forward(probe)
    gap = float((hooked_logits - ortho_logits)[probe["attention_mask"].bool()].abs().max())
    echo(f"Improve: orthogonalised weights reproduce the hook-based ablation (max |logit difference| {gap:.2e})")
    del ortho

    section.metrics = {
        "layer": layer,
        "position": position,
        "subspace": [list(m) for m in selection.members],
        "refusal_forbidden": {"before": before, "after": after},
        "evaluation": {m: {"before": result.before(m), "after": result.after(m)} for m in result.metrics},
        "orthogonalised_max_logit_gap": gap,
    }
    section.add("section", "1. Refusal: locate the refusal direction, remove it, measure")
    section.add(
        "text",
        f"Locate. Candidate directions are differences of mean residual activations (hook_resid_pre) between "
        f"{len(forbidden)} forbidden and {len(benign)} benign requests, one per layer and end position, made "
        "orthogonal to the principal directions of ordinary prompts. Each candidate is scored by the refusal "
        "log-odds left on forbidden requests when it is ablated (lower is better) and by the KL it causes on "
        f"ordinary text (Arditi et al. 2024). Chosen: {members}."
        + (
            ""
            if direction.rank == 1
            else f" No single candidate removed refusal here, so the span of the {direction.rank} best "
            "candidates is ablated together (refusal spread over a few directions, as Wollschläger et al. 2025 "
            "find in larger models)."
        ),
    )
    section.add("figure", selection.plot("ablation_score", title="Refusal log-odds under ablation, per candidate"))
    section.add(
        "text",
        "Steer. Directional ablation projects the direction out of every residual-stream write at every layer "
        "and position. Improve. The harness measures the target (refusal on held-out requests) and the side "
        "effects (KL and perplexity on neutral text, accuracy on the organism's other planted tasks).",
    )
    section.add("table", markdown_rows(result.table()))
    section.add("figure", rates_figure(result, "Refusal direction ablated: target and side effects"))
    section.add("table", markdown_rows(result.samples_table()))
    section.add(
        "note",
        f"Weight orthogonalisation makes the ablation permanent (a model plain transformers loads): its logits "
        f"equal the hook-based ablation's to {gap:.1e} on 16 prompts.",
    )
    return section


__all__ = ["run"]
