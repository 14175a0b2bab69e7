"""Circuit comparison by edges (EAP / EAP-IG on two models): definitions on tiny models, and before vs after
fine-tuning on the shipped organism variants (the planted head's edges gained, the control's change small)."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.errors import ConfigError
from mechscope.improve.diffing.circuits import CircuitDiff, circuit_diff, compare_edge_scores
from mechscope.improve.diffing.planted import NEW_TRIGGER, RECIPES
from mechscope.locate.circuits import EdgeScores, eap
from mechscope.locate.metrics import logit_diff
from mechscope.model.hooked import HookedModel
from mechscope.steer.finetune import FinetuneConfig, finetune
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 100, (3, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 100, (3,), generator=gen)
    return clean, corrupt


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logit_diff(logits, [5, 6, 9], [7, 8, 10])


def test_a_model_against_itself_has_the_same_circuit_and_no_change():
    model = HookedModel(tiny_model("gpt2", with_tokenizer=False)[0])
    clean, corrupt = _pair()
    result = circuit_diff(model, model, clean, corrupt, _metric, method="eap", top=10)
    assert float(result["change"].abs().max()) == 0.0
    assert result.jaccard == 1.0 and result.config["gained"] == [] and result.config["lost"] == []
    assert result.config["correlation"] == pytest.approx(1.0)


def test_the_comparison_is_the_edge_for_edge_difference_of_the_two_attributions(tmp_path):
    hf, tok = tiny_model("gpt2")
    base = HookedModel(hf, tok)
    tuned = HookedModel(tiny_model("gpt2")[0], tok)
    finetune(tuned, [("A cat sat on the", " dog")] * 4, FinetuneConfig(components=("blocks.1.attn.head.2",), steps=20))
    clean, corrupt = _pair()
    a, b = eap(base, clean, corrupt, _metric), eap(tuned, clean, corrupt, _metric)
    result = compare_edge_scores(a, b, top=8, names=("base", "tuned"))
    assert result.labels["edge"] == a.edge_names == b.edge_names
    assert torch.equal(result["change"], b["scores"].double() - a["scores"].double())
    by_abs = lambda s: [a.edge_names[i] for i in s.abs().argsort(descending=True, stable=True)[:8].tolist()]  # noqa: E731
    assert result.config["top_a"] == by_abs(a["scores"]) and result.config["top_b"] == by_abs(b["scores"])
    top_a, top_b = set(result.config["top_a"]), set(result.config["top_b"])
    assert set(result.config["gained"]) == top_b - top_a and set(result.config["lost"]) == top_a - top_b
    assert result.jaccard == pytest.approx(len(top_a & top_b) / len(top_a | top_b))
    ranked = result.ranking()
    assert abs(ranked[0][1]) == float(result["change"].abs().max())
    loaded = CircuitDiff.load(result.save(tmp_path / "c.safetensors"))
    assert torch.equal(loaded["change"], result["change"]) and loaded.config["top_b"] == result.config["top_b"]
    assert result.plot() is not None and "Jaccard" in result.summary()


def test_bad_input_is_refused():
    model = HookedModel(tiny_model("gpt2", with_tokenizer=False)[0])
    clean, corrupt = _pair()
    with pytest.raises(ConfigError, match="method must be one of"):
        circuit_diff(model, model, clean, corrupt, _metric, method="acdc")
    with pytest.raises(ConfigError, match="top must be a positive int"):
        circuit_diff(model, model, clean, corrupt, _metric, top=0)
    other = HookedModel(tiny_model("gpt2", n_layer=3, with_tokenizer=False)[0])
    a, b = eap(model, clean, corrupt, _metric), eap(other, clean, corrupt, _metric)
    result = compare_edge_scores(a, b)  # models of different depth: compared on their common edges
    assert result.config["shared_edges"] == len(set(a.edge_names) & set(b.edge_names)) > 0
    renamed = EdgeScores(
        tensors=dict(b.tensors),
        axes=dict(b.axes),
        labels={"edge": [f"x{i}" for i in range(len(b.edge_names))]},
        config=dict(b.config),
    )
    with pytest.raises(ConfigError, match="share no edge"):
        compare_edge_scores(a, renamed)


@pytest.fixture(scope="module")
def backdoor_task():
    base = ms.load_model("organism-gpt2")
    prompts = RECIPES["backdoor_head"].prompts(0)
    corrupt = [p.replace(NEW_TRIGGER, "|KETA|") for p in prompts]  # the same token count, no trigger
    access = base.to_single_token(" ACCESS")

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, access] - logits[:, -1].logsumexp(-1)  # log p(' ACCESS') at the answer

    return base, prompts, corrupt, metric


def test_eap_circuits_before_and_after_the_backdoor_finetune_differ_at_the_planted_head(backdoor_task):
    base, prompts, corrupt, metric = backdoor_task
    tuned = ms.load_model("organism-gpt2+backdoor_head")
    result = circuit_diff(base, tuned, prompts, corrupt, metric, names=("organism-gpt2", "backdoor_head"))
    # measured (EAP-IG, 5 steps, 16 prompts): a2.h2->logits +0.83 first; Jaccard of the top-20 circuits 0.18
    assert result.ranking(1)[0][0] == "a2.h2->logits"
    assert result.config["gained"][0] == "a2.h2->logits"
    assert any(e.startswith("m0->a2.h2") for e in result.config["gained"])  # the head's new key input
    assert result.jaccard < 0.5
    control = ms.load_model("organism-gpt2+control")
    same = circuit_diff(base, control, prompts, corrupt, metric, names=("organism-gpt2", "control"))
    # measured: largest change 0.036 (vs 0.83), score correlation 0.93 (vs 0.27)
    assert float(same["change"].abs().max()) < 0.1 * float(result["change"].abs().max())
    assert same.config["correlation"] > 0.8 > result.config["correlation"]
