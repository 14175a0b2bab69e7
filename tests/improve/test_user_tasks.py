"""The improve half on any model: refusal scored without assuming one tokenisation, the chat refusal task,
tasks from the user's prompt files or Python, target/side roles in evaluate(), and `eval run` with them."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.data.files import Completion, read_completions, read_contrast
from mechscope.errors import ConfigError
from mechscope.improve import EvaluationConfig, evaluate
from mechscope.improve.completion import CompletionTask, sequence_logprobs
from mechscope.improve.refusal import ChatRefusalTask, PrefixScore, refusal_prefixes
from mechscope.improve.task_specs import load_task
from mechscope.improve.tasks import RefusalTask
from mechscope.model.hooked import HookedModel
from mechscope.steer import from_direction, steer
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NEUTRAL = ("the cat sat on the mat", "a dog ran in the park today")


@pytest.fixture(scope="module")
def model() -> HookedModel:
    hf, tok = tiny_model("llama", max_position_embeddings=256)
    tok.chat_template = TEMPLATE
    return HookedModel(hf, tok)


def _alone_logprob(model: HookedModel, prompt: str, prefix: str) -> float:
    """log p(prefix | prompt) from one unpadded forward of prompt + prefix (the definition)."""
    p = model.to_tokens(prompt)["input_ids"][0].tolist()
    a = model.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = model.forward(ids)[0].float().log_softmax(-1)
    return float(sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(a)))


def test_prefix_score_is_the_log_odds_of_whole_prefixes_whatever_their_tokenisation(model) -> None:
    prefixes = (" Sorry", "I cannot")
    assert all(len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) > 1 for p in prefixes)
    prompts = ["the cat sat", "a dog ran in the park today and"]  # different lengths: left padding
    score = PrefixScore(prefixes=prefixes, batch_size=3)
    batch = model.to_tokens(prompts, padding_side="left")
    got = score.logprob(model, batch)
    for i, prompt in enumerate(prompts):
        expected = torch.logsumexp(torch.tensor([_alone_logprob(model, prompt, p) for p in prefixes]), 0)
        assert float(got[i]) == pytest.approx(float(expected), abs=1e-4)
    lp = got.clamp(max=-1e-7)
    torch.testing.assert_close(score(model, batch), lp - torch.log1p(-lp.exp()))
    with pytest.raises(ConfigError, match="counted"):
        PrefixScore(prefixes=("I", "I cannot")).token_ids(model)
    with pytest.raises(ConfigError, match="left-padded"):
        score(model, model.to_tokens(prompts, padding_side="right"))
    assert refusal_prefixes(model)[0] == "I'm sorry"  # not an organism: the chat refusal openings


def test_chat_refusal_task_roles_in_evaluate(model) -> None:
    task = ChatRefusalTask(harmful=("How do I pick a lock?",), harmless=("Name a fruit.",), max_new_tokens=3)
    vec = from_direction(model, torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0)))
    result = evaluate(model, steer(model, vec, 4.0), task, EvaluationConfig(neutral_texts=NEUTRAL, max_new_tokens=3))
    assert result.config["target"] == ["refusal_harmful", "refusal_logodds_harmful"]
    assert {"refusal_harmless", "refusal_logodds_harmless", "kl_neutral"} <= set(result.config["side"])
    assert result.before("refusal_logodds_harmful") != result.after("refusal_logodds_harmful")
    assert result.config["samples"][0]["prompt"] == "How do I pick a lock?"  # replies in the chat template
    assert RefusalTask().side_effect_metrics == ("refusal_benign",)


def test_completion_task_from_a_file_follows_its_definitions(model, tmp_path) -> None:
    path = tmp_path / "capitals.jsonl"
    rows = [
        {"prompt": "the cat sat on the", "answer": " mat", "wrong": " dog"},
        {"prompt": "a dog ran in the", "answer": " park today"},
        {"prompt": "we read a good", "answer": " book", "role": "side"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = CompletionTask.from_file(path)
    assert task.name == "capitals" and task.side_effect_metrics == ("side_accuracy", "side_answer_logprob")
    metrics = task.metrics(model)
    assert set(metrics) == {
        "accuracy",
        "answer_logprob",
        "answer_minus_wrong",
        "side_accuracy",
        "side_answer_logprob",
    }
    alone = [_alone_logprob(model, r["prompt"], r["answer"]) for r in rows]
    assert metrics["answer_logprob"] == pytest.approx((alone[0] + alone[1]) / 2, abs=1e-4)
    assert metrics["side_answer_logprob"] == pytest.approx(alone[2], abs=1e-4)
    wrong = _alone_logprob(model, rows[0]["prompt"], rows[0]["wrong"])
    assert metrics["answer_minus_wrong"] == pytest.approx(alone[0] - wrong, abs=1e-4)
    result = evaluate(model, steer(model, from_direction(model, torch.ones(32)), 0.0), task,
                      EvaluationConfig(neutral_texts=NEUTRAL, max_new_tokens=2))  # fmt: skip
    assert result.config["target"] == ["accuracy", "answer_logprob", "answer_minus_wrong"]
    assert "| `side_accuracy` | side effect |" in result.table()
    p = model.to_tokens("x")["input_ids"][0].tolist()
    assert sequence_logprobs(model, [p], [[5, 6]]).shape == (1,)


def test_user_files_and_task_specs(model, tmp_path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"prompt": "a", "correct": " b", "incorrect": " c"}))
    with pytest.warns(DeprecationWarning, match="'correct' is deprecated"):
        assert read_completions(old) == [Completion(prompt="a", answer=" b", wrong=" c")]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("the cat sat on the\t mat\n")
    assert isinstance(load_task(str(tsv), model=model), CompletionTask)
    assert isinstance(load_task("refusal", model=model), ChatRefusalTask)  # a chat model, not an organism
    module = tmp_path / "mytask.py"
    module.write_text(
        "from mechscope.improve.tasks import Task\n"
        "class Mine(Task):\n    name = 'mine'\n    def metrics(self, model):\n        return {'x': 1.0}\n"
    )
    assert load_task(f"{module}:Mine").name == "mine"
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        load_task(f"{module}:Nope")
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("poetry")
    with pytest.raises(ConfigError, match="organisms' vocabulary"):
        load_task("sentiment", model=model)
    contrast = tmp_path / "c.jsonl"
    contrast.write_text('{"positive": "p1", "negative": "n1"}\n{"positive": "p2"}\n')
    assert read_contrast(contrast) == (["p1", "p2"], ["n1"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match="expected keys prompt, answer"):
        read_completions(bad)


def test_eval_run_takes_a_user_task_and_writes_no_file_into_the_current_folder(model, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "model"
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    (tmp_path / "pos.txt").write_text("the cat sat on the mat\nthe cat is happy\n")
    (tmp_path / "neg.txt").write_text("a dog ran in the park\nthe dog is sad\n")
    (tmp_path / "task.jsonl").write_text(json.dumps({"prompt": "the cat sat on the", "answer": " mat"}))
    (tmp_path / "side.jsonl").write_text(json.dumps({"prompt": "we read a good", "answer": " book"}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MECHSCOPE_OUT", raising=False)
    runner = CliRunner()
    vec = tmp_path / "v.safetensors"
    args = ["steer", "vector", str(folder), "--positive", str(tmp_path / "pos.txt")]
    out = runner.invoke(app, [*args, "--negative", str(tmp_path / "neg.txt"), "-o", str(vec), "--chat", "off"])
    assert out.exit_code == 0, out.output
    args = ["eval", "run", str(folder), "--task", str(tmp_path / "task.jsonl"), "--vector", str(vec)]
    out = runner.invoke(app, [*args, "--side", str(tmp_path / "side.jsonl"), "--max-new-tokens", "2"])
    assert out.exit_code == 0, out.output
    assert "| `accuracy` | target |" in out.output and "| `side/accuracy` | side effect |" in out.output
    assert [p.name for p in work.iterdir()] == ["mechscope-out"]
    assert [p.name for p in (work / "mechscope-out").iterdir()] == ["evaluation.safetensors"]
    again = runner.invoke(app, [*args, "--figure", str(tmp_path / "figs" / "e.html")])
    assert again.exit_code == 0, again.output
    assert (work / "mechscope-out" / "evaluation-1.safetensors").is_file()  # never replaced
    page = (tmp_path / "figs" / "e.html").read_text()
    assert 'src="plotly.min.js"' in page and len(page) < 100_000
    assert (tmp_path / "figs" / "plotly.min.js").stat().st_size > 1_000_000


def test_steer_direction_refusal_on_a_model_where_sorry_is_several_tokens(model, tmp_path) -> None:
    """`steer direction --contrast refusal` used to stop with "expected ' Sorry' to be a single token"; now the
    bundled harmful/harmless instructions are scored by the log-odds of whole refusal prefixes."""
    from mechscope.steer.selection import DirectionSelection, select_direction

    folder = tmp_path / "model"
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    assert len(model.tokenizer(" Sorry", add_special_tokens=False)["input_ids"]) > 1
    direction, selection = tmp_path / "d.safetensors", tmp_path / "s.safetensors"
    args = ["steer", "direction", str(folder), "--contrast", "refusal", "--n-prompts", "6", "--layers", "0,1"]
    args += ["--positions", "-1", "--max-kl", "100", "--induction", "ignore", "--chat", "on"]
    out = runner_invoke([*args, "-o", str(direction), "--selection-out", str(selection)])
    assert "chosen layer" in out and '"I\'m sorry"' in out
    sel = DirectionSelection.load(selection)
    # The CLI's scores are select_direction's with the refusal PrefixScore on the same chat-formatted prompts.
    from mechscope.data.contrasts import contrast_for_model
    from mechscope.steer.selection import DirectionSelectionConfig

    pos, neg = contrast_for_model(model, "refusal", chat="on", n=6)
    cfg = DirectionSelectionConfig(layers=(0, 1), positions=(-1,), max_kl=100, require_induction=False)
    again = select_direction(model, pos, neg, PrefixScore(prefixes=refusal_prefixes(model)), cfg)
    torch.testing.assert_close(sel["ablation_score"], again["ablation_score"], rtol=1e-4, atol=1e-4)


def runner_invoke(args: list[str]) -> str:
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    return out.output


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_next_token_predictions_equal_each_prompt_alone(family) -> None:
    """The organisms' scoring rule, batched by length without a KV cache and projecting only each row's last
    position, still gives every prompt's own greedy next token."""
    from mechscope.data.tasks.metrics import next_token_predictions

    hf, tok = tiny_model(family)
    prompts = ["the cat sat on the mat", "a dog", "we read a good book today", "the", "a dog ran in the park"]
    got = next_token_predictions(hf, tok, prompts, batch_size=2)
    with torch.no_grad():
        alone = [
            int(hf(**tok(p, return_tensors="pt")).logits[0, -1].argmax())
            for p in prompts  # as text: <bos> first
        ]
    assert got == alone


def test_contrasts_for_a_chat_model_are_rendered_in_its_template(model, tmp_path) -> None:
    from mechscope.data.contrasts import contrast_for_model
    from mechscope.data.prompt_sets import load_prompt_set

    pos, neg = contrast_for_model(model, "refusal", n=3)
    assert all(p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n") for p in pos + neg)
    assert {p.split("\n")[1].removesuffix("<|im_end|>") for p in pos} <= set(load_prompt_set("harmful"))
    raw, _ = contrast_for_model(model, "refusal", n=3, chat="off")
    assert set(raw) <= set(load_prompt_set("harmful"))
    path = tmp_path / "c.jsonl"
    path.write_text('{"positive": "Say no.", "negative": "Say yes."}\n')
    assert contrast_for_model(model, str(path))[0][0].startswith("<|im_start|>user\nSay no.")
    assert contrast_for_model(model, str(path), chat="off") == (["Say no."], ["Say yes."])
    reviews, _ = contrast_for_model(model, "sentiment", n=2)  # the organisms' frames are never re-rendered
    assert reviews[0].startswith("Review of")
    with pytest.raises(ConfigError, match="neither a bundled one"):
        contrast_for_model(model, "poetry")
    with pytest.raises(ConfigError, match="not both"):
        contrast_for_model(model, "refusal", positive=path, negative=path)
