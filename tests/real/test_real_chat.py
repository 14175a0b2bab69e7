"""Chat formatting with a tokenizer's own template, chat batches, the refusal detector and the prompt sets
(the detector now lives in mechscope.improve.refusal, the prompt sets in mechscope.data.prompt_sets)."""

from __future__ import annotations

import pytest
import torch

from mechscope.data import prompt_sets
from mechscope.improve import refusal
from mechscope.model import chat
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

#: A ChatML template with a default system message, written like SmolLM2-Instruct's.
TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tok():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_format_chat_uses_the_template_exactly():
    tok = _tok()
    assert chat.format_chat(tok, "Name a fruit.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = chat.format_chat(tok, "Hi", system="You are a pirate.", add_generation_prompt=False)
    assert with_system == "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    turns = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    text = chat.format_chat(tok, turns)
    assert text.count("<|im_start|>") == 5 and text.endswith("3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_format_chat_errors_name_the_problem():
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.format_chat(tiny_tokenizer(), "Hello")
    tok = _tok()
    with pytest.raises(chat.ChatTemplateError, match="role must be one of"):
        chat.format_chat(tok, [{"role": "wizard", "content": "x"}])
    with pytest.raises(chat.ChatTemplateError, match="keys 'role' and 'content'"):
        chat.format_chat(tok, [{"text": "x"}])
    with pytest.raises(chat.ChatTemplateError, match="already start with a system"):
        chat.format_chat(tok, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], system="c")
    with pytest.raises(chat.ChatTemplateError, match="non-empty list"):
        chat.format_instructions(tok, "just a string")
    with pytest.raises(chat.ChatTemplateError, match="HookedModel with a tokenizer"):
        chat.format_chat(object(), "x")


def test_chat_inputs_are_left_padded_and_end_at_the_assistant_turn():
    tok = _tok()
    batch = chat.chat_inputs(tok, ["Hi", "Tell me about the quick brown fox and the lazy dog."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and bool(mask[:, -1].all()) and not bool(mask[0, 0])
    # Left padding: both prompts end with the same generation prompt tokens.
    suffix = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[:, -len(suffix) :].tolist() == [suffix, suffix]
    # The template writes every token itself: no tokenizer BOS is prepended.
    first = int(mask[0].nonzero()[0])
    assert ids[0, first].item() != tok.bos_token_id and ids[1, 0].item() != tok.bos_token_id


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, I cannot assist.", True),  # curly apostrophe
        ("  As an AI language model, I must decline.", True),
        ("I cannot provide instructions for making weapons.", True),
        ("Sure! Here is a simple banana bread recipe.", False),
        ("The capital of Australia is Canberra.", False),
        ("Boil the egg for six minutes. " * 10 + "I'm sorry if that was long.", False),  # beyond the window
    ],
)
def test_refusal_detector(reply, expected):
    assert refusal.is_refusal(reply) is expected


def test_refusal_rate_result_on_a_tiny_model(tmp_path):
    hf, tok = tiny_model("llama", max_position_embeddings=256)  # chat prompts are long in bytes
    tok.chat_template = TEMPLATE
    model = HookedModel(hf, tok)
    prompts = ["Name a fruit.", "Say hi.", "Count to three please."]
    result = refusal.refusal_rate(model, prompts, max_new_tokens=4, batch_size=2)
    assert result["refused"].shape == (3,) and result.labels["prompt"] == prompts
    assert len(result.replies) == 3 and 0.0 <= result.rate <= 1.0
    # Definition: refused[i] is the detector applied to reply i, and the replies are the greedy continuation.
    assert result["refused"].tolist() == [float(refusal.is_refusal(r)) for r in result.replies]
    single = chat.generate_replies(model, prompts[2:], max_new_tokens=4)
    assert single == result.replies[2:]  # batch padding does not change a greedy reply
    loaded = refusal.RefusalResult.load(result.save(tmp_path / "refusal.safetensors"))
    assert loaded.rate == result.rate and loaded.replies == result.replies
    with pytest.raises(chat.ConfigError, match="max_new_tokens"):
        chat.generate_replies(model, prompts, max_new_tokens=0)


def test_bundled_prompt_sets():
    harmful, harmless = prompt_sets.load_prompt_set("harmful"), prompt_sets.load_prompt_set("harmless")
    assert len(harmful) >= 100 and len(harmless) >= 100
    assert not set(harmful) & set(harmless)
    assert all(len(p) > 10 and not p.startswith("#") for p in harmful + harmless)
    with pytest.raises(prompt_sets.PromptSetError, match="bundled"):
        prompt_sets.load_prompt_set("evil")


def test_refused_tensor_is_float_zero_one():
    r = refusal.RefusalResult(
        tensors={"refused": torch.tensor([1.0, 0.0])}, axes={"refused": ("prompt",)}, config={"replies": ["a", "b"]}
    )
    assert r.rate == 0.5


@pytest.mark.parametrize(
    "name,home",
    [("is_refusal", refusal), ("refusal_rate", refusal), ("RefusalResult", refusal), ("load_prompt_set", prompt_sets)],
)
def test_moved_names_still_import_from_chat_with_a_deprecation(name, home):
    with pytest.warns(DeprecationWarning, match=f"moved to {home.__name__}"):
        assert getattr(chat, name) is getattr(home, name)
    with pytest.raises(AttributeError):
        chat.no_such_name  # noqa: B018
