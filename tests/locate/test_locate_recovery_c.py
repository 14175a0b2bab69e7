"""Recovery of planted mechanisms by circuit discovery on the bundled organisms.

``organism-induction`` (2 layers, one head each, MLPs zero): the induction head ``a1.h0`` writing to the
logits, fed by the previous-token head ``a0.h0`` through its query/key (composition), must appear in the
circuits that EAP-IG and ACDC find for copying a repeated random-token span, and the circuit must be
faithful. ``organism-gpt2`` IOI (learned since v3): activation patching, path patching and EAP-IG name
the same heads (docs/locate-circuits.md).
"""

from __future__ import annotations

import random

import pytest
import torch

from mechscope.locate.circuits import acdc, eap_ig, faithfulness, faithfulness_curve
from mechscope.locate.circuits.faithfulness import CircuitEvaluator
from mechscope.locate.metrics import logit_diff

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


def induction_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, object]:
    from mechscope.data.tasks.induction import sequences

    batch = sequences(0, "circuits", n, seq_len=32, token_range=(1, 4096), span=(4, 8), dense=True)
    clean = batch.tokens
    corrupt = torch.randint(1, 4096, clean.shape, generator=torch.Generator().manual_seed(5))
    targets, weights = clean[:, 1:], batch.repeat_mask[:, 1:].float()

    def metric(logits: torch.Tensor) -> torch.Tensor:
        """Mean log-probability of the repeated tokens (each row)."""
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return (logp * weights).sum(1) / weights.sum(1)

    return clean, corrupt, metric


@pytest.fixture(scope="module")
def induction():
    import mechscope

    return mechscope.load_model("organism-induction")


def test_eap_ig_ranks_the_induction_head_output_first(induction):
    clean, corrupt, metric = induction_data()
    scores = eap_ig(induction, clean, corrupt, metric, steps=5)
    top = [scores.edge_names[i] for i in scores.ranking()[:3].tolist()]
    assert "a1.h0->logits" in top
    # The estimate agrees with exact single-edge ablation on the induction head's output edge.
    ev = CircuitEvaluator(induction, clean, corrupt, metric)
    edge = scores.edge_names.index("a1.h0->logits")
    mask = torch.ones(ev.graph.n_edges, dtype=torch.bool)
    mask[edge] = False
    exact = ev.metric(mask) - ev.full_metric
    assert exact < -1.0  # removing the induction head's output costs more than a nat per repeated token
    assert float(scores["scores"][edge]) == pytest.approx(exact, rel=0.3)


def test_acdc_recovers_the_two_head_induction_circuit(induction):
    clean, corrupt, metric = induction_data()
    circuit = acdc(induction, clean, corrupt, metric, threshold=0.05)
    edges = set(circuit.edges)
    assert "a1.h0->logits" in edges
    assert {"a0.h0->a1.h0.k", "a0.h0->a1.h0.q"} & edges  # the previous-token head composes with it
    assert not any(e.startswith("m") or "->m" in e for e in edges)  # the zeroed MLPs are pruned
    assert faithfulness(induction, circuit, clean, corrupt, metric).value > 0.9
    curve = faithfulness_curve(induction, eap_ig(induction, clean, corrupt, metric), clean, corrupt, metric)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)


def ioi_data(model, n: int = 16):
    """IOI prompts of one token length and their ABC corruption (S2 replaced by a third name)."""
    from mechscope.data.tasks import vocab

    rng = random.Random(0)
    template = "When {a} and {b} went to the {place}, {s} gave a {obj} to"
    clean, corrupt, io, subj = [], [], [], []
    while len(clean) < n:
        a, b, c = rng.sample(vocab.IOI_NAMES, 3)
        place, obj = rng.choice(vocab.IOI_PLACES), rng.choice(vocab.IOI_OBJECTS)
        x, y = (template.format(a=a, b=b, s=s, place=place, obj=obj) for s in (b, c))
        lengths = {len(model.to_tokens(t)["input_ids"][0]) for t in [x, y, *clean[:1]]}
        if len(lengths) != 1:
            continue
        clean.append(x)
        corrupt.append(y)
        io.append(model.to_single_token(" " + a))
        subj.append(model.to_single_token(" " + b))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, io, subj)

    return clean, corrupt, metric


def test_ioi_circuit_on_organism_gpt2_agrees_across_patching_path_patching_and_eap_ig():
    import mechscope
    from mechscope.locate.patching import activation_patch
    from mechscope.locate.path_patching import path_patch

    model = mechscope.load_model("organism-gpt2")
    clean, corrupt, metric = ioi_data(model)
    with torch.no_grad():
        clean_diff = float(metric(model.forward(clean)).mean())
    assert clean_diff > 5.0  # the organism has learned IOI (its card: 1.00 held-out accuracy)
    n_heads = model.dims.n_heads

    def head(i: int) -> str:
        return f"a{i // n_heads}.h{i % n_heads}"

    def top(effect: torch.Tensor, k: int, first_layer: int = 0) -> list[str]:
        effect = effect[first_layer:].flatten().abs()
        return [head(i + first_layer * n_heads) for i in effect.argsort(descending=True)[:k].tolist()]

    noised = activation_patch(model, clean, corrupt, "heads", metric, direction="noising")["metric"] - clean_diff
    direct = path_patch(model, clean, corrupt, metric).effect()  # head -> logits, everything else frozen
    scores = eap_ig(model, clean, corrupt, metric)
    ranked = [scores.edge_names[i] for i in scores.ranking().tolist()]
    # Name movers: the heads that write the answer directly (path patching) are among the three that
    # activation patching ranks first after layer 0 (of 18; v4: L3H3 -0.20, L2H0 -0.17, L3H0 -0.17, while
    # the layer-0 heads carry most of the 9.8), and EAP-IG's strongest head -> logits edge comes from one.
    movers = top(direct, 2)
    assert set(movers) <= set(top(noised, 3, first_layer=1)), (movers, top(noised, 3, first_layer=1))
    # (the strongest head -> logits edge, wherever it ranks: in v4 the early heads' edges come first)
    first_into_logits = next(e for e in ranked if e.endswith("->logits") and e.startswith("a"))
    assert first_into_logits.split("->")[0] in movers, (first_into_logits, movers)
    # The early heads that read the changed name token: activation patching's top head overall is the
    # head of EAP-IG's strongest edges.
    (early,) = top(noised, 1)
    assert any(early in e for e in ranked[:3]), (early, ranked[:3])
    assert faithfulness(model, scores.top(200), clean, corrupt, metric).value > 0.9
