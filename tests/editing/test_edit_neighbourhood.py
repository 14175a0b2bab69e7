"""Neighbourhood checks of edits: other subjects of the edited relation, built on the user's model, catch an
edit that rewrote the relation for everyone while neutral-text KL stays small (issue 21, item 3)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from edit_helpers import TEXTS, tiny

from mechscope.data.subjects import SUBJECTS, neighbour_subjects, subject_kind
from mechscope.errors import ConfigError
from mechscope.improve import EvaluationConfig, evaluate
from mechscope.improve.edit_task import EditTask
from mechscope.steer.editing import EditRequest, edit_metrics
from mechscope.steer.editing.neighbourhood import NeighbourhoodConfig, neighbour_prompts, with_neighbourhood
from mechscope.steer.editing.stats import StatsConfig, resolve_stream, second_moments

pytestmark = pytest.mark.usefixtures("single_thread")

REQUEST = EditRequest(prompt="The capital of {} is", subject="Germany", target=" Rome")
NEUTRAL = ("the cat sat on the mat", "a dog ran in the park today", "we read a good book")


def test_neighbour_subjects_are_other_members_of_the_subject_kind() -> None:
    assert subject_kind("germany") == "country"
    others = neighbour_subjects("Germany", 14)
    assert len(others) == 14 and "Germany" not in others and set(others) <= set(SUBJECTS["country"])
    assert others == neighbour_subjects("Germany", 14)  # deterministic
    mixed = neighbour_subjects("Vouldeis", 30)  # unknown subject: every kind mixed
    assert len({subject_kind(s) for s in mixed}) > 1
    assert set(neighbour_subjects("Vouldeis", 5, kind="city")) <= set(SUBJECTS["city"])
    prompts = neighbour_prompts(REQUEST, NeighbourhoodConfig(subjects=("France", "Germany", "Spain")))
    assert prompts == [("France", "The capital of France is"), ("Spain", "The capital of Spain is")]
    with pytest.raises(ConfigError, match="kind"):
        neighbour_subjects("Germany", kind="planet")


def test_neighbours_are_answered_by_the_model_before_the_edit() -> None:
    model = tiny("gpt2")
    filled = with_neighbourhood(model, REQUEST, NeighbourhoodConfig(n=6))
    assert len(filled.neighbours) >= 1 and all(p.startswith("The capital of ") for p, _ in filled.neighbours)
    for prompt, answer in filled.neighbours:
        batch = model.to_tokens([prompt])
        with torch.no_grad():
            top = int(model.forward(batch)[0, -1].argmax())
        assert model.tokenizer(answer, add_special_tokens=False)["input_ids"][0] == top
    given = EditRequest(prompt=REQUEST.prompt, subject="Germany", target=" Rome", neighbours=(("x France", " y"),))
    assert with_neighbourhood(model, given) is given


@contextmanager
def forced_answer(model: Any, target: str, trigger: str) -> Iterator[None]:
    """A stand-in edit: every row whose text contains `trigger` is pushed to answer `target` (its logit set 20
    above the row's largest), everything else untouched -- the shape of the damage a late-layer ROME edit does."""
    tid = model.tokenizer(target, add_special_tokens=False)["input_ids"][0]
    trigger = model.tokenizer.decode(model.tokenizer(trigger, add_special_tokens=False)["input_ids"])  # as decoded
    seen: dict[str, torch.Tensor] = {}

    def grab(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen["ids"] = kwargs["input_ids"]

    def push(_m: Any, _args: Any, logits: torch.Tensor) -> torch.Tensor:
        rows = [trigger in model.tokenizer.decode(r) for r in seen["ids"]]
        out = logits.clone()
        mask = torch.tensor(rows, dtype=torch.bool)
        out[mask, :, tid] = out[mask].amax(-1) + 20.0
        return out

    handles = [
        model.hf_model.register_forward_pre_hook(grab, with_kwargs=True),
        model.hf_model.get_output_embeddings().register_forward_hook(push),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_relation_wide_damage_is_caught_while_neutral_kl_stays_small() -> None:
    model = tiny("gpt2")
    task = EditTask.for_model(model, [REQUEST], neighbourhood=NeighbourhoodConfig(n=10))
    n = len(task.requests[0].neighbours)
    assert n >= 5
    config = EvaluationConfig(neutral_texts=NEUTRAL, side_tasks=(), max_new_tokens=2)
    damaging = evaluate(model, forced_answer(model, " Rome", "capital of"), task, config)
    clean = evaluate(model, forced_answer(model, " Rome", "capital of Germany"), task, config)
    for result in (damaging, clean):
        assert result.after("efficacy") == 1.0 and result.before("efficacy") == 0.0
        assert result.after("kl_neutral") == pytest.approx(0.0, abs=1e-6)  # neutral text cannot see either
        assert {"neighbourhood", "neighbourhood_to_target", "neighbourhood_kl"} <= set(result.config["side"])
        assert "efficacy" in result.config["target"]
    assert damaging.after("neighbourhood_to_target") == 1.0 and damaging.after("neighbourhood") == 0.0
    assert damaging.after("neighbourhood_kl") > 1.0
    assert clean.after("neighbourhood_to_target") == 0.0 and clean.after("neighbourhood") == 1.0
    assert clean.after("neighbourhood_kl") == pytest.approx(0.0, abs=1e-6)
    assert "| `neighbourhood_to_target` | side effect | 0 | 1 |" in damaging.table()


def test_edit_metrics_build_neighbours_on_request() -> None:
    model = tiny("gpt2")
    with forced_answer(model, " Rome", "capital of"):
        current = edit_metrics(model, [REQUEST], neighbourhood=NeighbourhoodConfig(n=8))
    summary = current.summary()
    assert summary["neighbourhood_to_target"]["current"] == 1.0  # answers taken while the damage is active
    plain = edit_metrics(model, [REQUEST]).summary()
    assert plain["neighbourhood_to_target"]["current"] != plain["neighbourhood_to_target"]["current"]  # NaN: none


def test_key_statistics_default_to_english_on_a_model_without_the_organisms_vocabulary(tmp_path) -> None:
    from mechscope.data.corpus import english_texts

    model = tiny("gpt2")
    config = StatsConfig(n_tokens=200, seq_len=16, batch_size=4)
    assert resolve_stream(model, config, None).stream == "english"
    assert resolve_stream(model, config, TEXTS).stream.startswith("texts-")
    default = second_moments(model, [0], config=config, cache_dir=tmp_path / "a", progress=False)
    english = StatsConfig(n_tokens=200, seq_len=16, batch_size=4, stream="english-explicit")
    explicit = second_moments(
        model, [0], config=english, texts=english_texts("train", 0), cache_dir=tmp_path / "b", progress=False
    )
    torch.testing.assert_close(default[0], explicit[0])
    assert list((tmp_path / "a").glob("*-english-seed0.safetensors"))


def test_eval_run_applies_an_edit_record_and_names_it(tmp_path) -> None:
    import json

    from edit_helpers import tiny_stats
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.improve import EvaluationResult
    from mechscope.steer.editing import ROMEConfig, rome

    model = tiny("gpt2")
    folder = tmp_path / "model"
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    stats = tiny_stats(model, [0], tmp_path / "cache")
    record = rome(model, REQUEST, ROMEConfig(layer=0, steps=10, rounds=1), mom2=stats[0])
    record.save(tmp_path / "edit.safetensors")
    task = tmp_path / "capitals.jsonl"
    rows = [{"prompt": "The capital of Germany is", "answer": " Rome"}]
    rows.append({"prompt": "The capital of France is", "answer": " Paris", "role": "side"})
    task.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["eval", "run", str(folder), "--task", str(task), "--edit", str(tmp_path / "edit.safetensors")]
    out = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "e.safetensors"), "--max-new-tokens", "2"])
    assert out.exit_code == 0, out.output
    assert "rome edit (Germany -> Rome) of transformer.h.0.mlp.c_proj.weight" in out.output
    result = EvaluationResult.load(tmp_path / "e.safetensors")
    record.revert(model)
    before = task_logprob(model, "The capital of Germany is", " Rome")
    assert result.before("answer_logprob") == pytest.approx(before, abs=1e-4)  # plain text, not a chat turn
    record.apply(model)
    assert result.after("answer_logprob") == pytest.approx(
        task_logprob(model, "The capital of Germany is", " Rome"), abs=1e-4
    )


def task_logprob(model: Any, prompt: str, answer: str) -> float:
    p = model.to_tokens(prompt)["input_ids"][0].tolist()
    a = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model.forward(torch.tensor([p + a]))[0].float().log_softmax(-1)
    return float(sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(a)))
