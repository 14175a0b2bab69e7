"""EAP and EAP-IG: scores equal exact edge ablation when the metric is linear in the edge, correlate with
it otherwise and converge to it as the ablation shrinks (also through Gemma's post-attention norms); EAP-IG
with one step is EAP; results save, load and plot; bad inputs raise."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.locate.circuits import EdgeScores, Graph, eap, eap_ig
from mechscope.locate.circuits.ablation import ablation_values
from mechscope.locate.circuits.faithfulness import CircuitEvaluator
from mechscope.locate.circuits.forward import graph_forward
from mechscope.locate.metrics import logit_diff
from mechscope.locate.patching import MetricError, PromptMismatchError
from mechscope.locate.results import Result
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def pair(batch: int = 3, pos: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 100, (batch, pos), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 100, (batch,), generator=gen)
    corrupt[:, 4] = torch.randint(4, 100, (batch,), generator=gen)
    return clean, corrupt


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logit_diff(logits, [5, 6, 9], [7, 8, 10])


def exact_effects(model, clean, corrupt, ablation: str = "resample", edges=None) -> torch.Tensor:
    """The metric change when each edge alone is ablated (every edge, or those listed)."""
    ev = CircuitEvaluator(model, clean, corrupt, metric, ablation=ablation)
    effects = []
    for edge in range(ev.graph.n_edges) if edges is None else edges:
        mask = torch.ones(ev.graph.n_edges, dtype=torch.bool)
        mask[edge] = False
        effects.append(ev.metric(mask) - ev.full_metric)
    return torch.tensor(effects)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eap_is_exact_for_edges_the_metric_is_linear_in(family):
    # A huge epsilon makes the final norm linear (x / sqrt(eps), rescaled), so every edge into the
    # logits changes the metric linearly and the first-order estimate must be exact.
    model = HookedModel(tiny_model(family, with_tokenizer=False)[0])
    norm = model.module(model.adapter.final_norm)
    with torch.no_grad():
        if family == "gpt2":
            norm.eps = 1e10
        else:
            norm.variance_epsilon = 1e10
        norm.weight.mul_(1e5)
    clean, corrupt = pair()
    scores = eap(model, clean, corrupt, metric)["scores"]
    names = Graph.from_model(model).edge_names
    into_logits = [i for i, name in enumerate(names) if name.endswith("->logits")]
    exact = exact_effects(model, clean, corrupt, edges=into_logits)
    assert exact.abs().max() > 1e-2
    torch.testing.assert_close(scores[into_logits], exact, rtol=1e-3, atol=1e-5)
    # An edge into an earlier receiver passes non-linear norms and attention: approximate only.
    into_q = [i for i, name in enumerate(names) if name.endswith(".q")][-3:]
    assert not torch.allclose(scores[into_q], exact_effects(model, clean, corrupt, edges=into_q), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gemma3_text", "olmo2"])
def test_eap_converges_to_exact_edge_ablation_as_the_ablation_shrinks(family):
    # Edges ablated towards values eps of the way from clean to corrupted: EAP's first-order estimate
    # (the public verb's score times eps) and one exact edge-ablated forward per edge agree as eps -> 0.
    # In Gemma 2/3 a head's output is its share of the post-normed attention output (the norm's scale
    # frozen, as in direct logit attribution), so the same holds there.
    model = HookedModel(tiny_model(family, with_tokenizer=False)[0])
    clean, corrupt = pair()
    graph = Graph.from_model(model)
    ct, xt = model.prepare_inputs(clean), model.prepare_inputs(corrupt)
    _, outs, corrupted = ablation_values(model, graph, ct, xt, "resample")
    eps = 1e-2
    estimate = eps * eap(model, clean, corrupt, metric)["scores"]
    edges = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(1))[:60].tolist()
    nearby = outs - eps * (outs - corrupted)
    with torch.no_grad():
        full = metric(model.forward(ct)).mean()
        exact = []
        for edge in edges:
            mask = torch.ones(graph.n_edges)
            mask[edge] = 0
            exact.append(metric(graph_forward(model, graph, ct, mask, ablated=nearby)).mean() - full)
    exact_t = torch.stack(exact)
    assert exact_t.abs().max() > 1e-4
    assert torch.corrcoef(torch.stack([estimate[edges], exact_t]))[0, 1] > 0.999
    assert (estimate[edges] - exact_t).abs().max() < 0.05 * exact_t.abs().max()


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_eap_correlates_with_exact_edge_ablation(model, ablation):
    clean, corrupt = pair()
    scores = eap(model, clean, corrupt, metric, ablation=ablation)["scores"]
    exact = exact_effects(model, clean, corrupt, ablation)
    corr = torch.corrcoef(torch.stack([scores, exact]))[0, 1]
    assert corr > 0.8, f"EAP vs exact correlation {corr:.3f}"


def test_eap_ig_tracks_exact_ablation_and_one_step_is_eap(model):
    clean, corrupt = pair()
    exact = exact_effects(model, clean, corrupt)
    ig = eap_ig(model, clean, corrupt, metric, steps=8)["scores"]
    assert torch.corrcoef(torch.stack([ig, exact]))[0, 1] > 0.9
    one = eap_ig(model, clean, corrupt, metric, steps=1)["scores"]
    torch.testing.assert_close(one, eap(model, clean, corrupt, metric)["scores"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("integrated", [False, True])
def test_chunked_backward_equals_one_batch_with_per_row_targets(model, integrated):
    clean, corrupt = pair()
    fn = eap_ig if integrated else eap
    whole = fn(model, clean, corrupt, metric)["scores"]
    chunked = fn(model, clean, corrupt, metric, batch_size=2)["scores"]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


def test_scores_save_load_top_and_plot(model, tmp_path):
    clean, corrupt = pair()
    result = eap(model, clean, corrupt, metric)
    loaded = Result.load(result.save(tmp_path / "eap.safetensors"))
    assert isinstance(loaded, EdgeScores)
    assert torch.equal(loaded["scores"], result["scores"])
    assert loaded.edge_names == Graph.from_model(model).edge_names
    circuit = loaded.top(5)
    assert circuit.n_edges == 5
    best = result["scores"].abs().argmax()
    assert result.edge_names[int(best)] in circuit.edges
    assert len(result.plot().data) == 1
    with pytest.raises(ConfigError, match="k must lie"):
        result.top(10**6)


def test_bad_inputs_raise_clear_errors(model):
    clean, corrupt = pair()
    with pytest.raises(PromptMismatchError, match="same \\[batch, pos\\] token shape"):
        eap(model, clean, corrupt[:, :5], metric)
    with pytest.raises(MetricError, match="scalar or \\[batch\\]"):
        eap(model, clean, corrupt, lambda logits: logits[:, -1])
    with pytest.raises(ConfigError, match="resample ablation needs corrupted prompts"):
        eap(model, clean, None, metric)
    with pytest.raises(ConfigError, match="ablation must be one of"):
        eap(model, clean, corrupt, metric, ablation="noise")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        eap_ig(model, clean, corrupt, metric, steps=0)
