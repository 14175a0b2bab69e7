"""Token helpers agree with the model's own tokenizer (special tokens, padding, offsets)."""

from __future__ import annotations

import functools
import random

import pytest
import torch
import transformers

from mechscope.errors import ConfigError
from mechscope.model import tokens as T
from mechscope.model.hooked import HookedModel
from tiny_models import BOS, PAD, SENTENCES, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = "The capital of France is Paris"
IOI = "When Mary and John went to the store, John gave a drink to Mary."


@functools.cache
def model() -> HookedModel:
    hf, tok = tiny_model("gpt2")
    return HookedModel(hf, tok)


@pytest.fixture
def tok():
    return tiny_tokenizer()


def test_to_tokens_single_text(tok):
    m = model()
    batch = m.to_tokens(TEXT)
    expected = tok(TEXT)["input_ids"]
    assert batch["input_ids"].tolist() == [expected]
    assert batch["input_ids"][0, 0] == BOS
    assert batch["attention_mask"].tolist() == [[1] * len(expected)]
    no_bos = m.to_tokens(TEXT, add_special_tokens=False)
    assert no_bos["input_ids"].tolist() == [expected[1:]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_to_tokens_batches_pad_on_the_requested_side(tok, side):
    texts = [TEXT, "Hello world!", IOI]
    batch = T.to_tokens(tok, texts, padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = max(len(tok(t)["input_ids"]) for t in texts)
    assert ids.shape == mask.shape == (3, width)
    for row, text in enumerate(texts):
        real = tok(text)["input_ids"]
        n = len(real)
        assert int(mask[row].sum()) == n
        if side == "right":
            assert ids[row, :n].tolist() == real
            assert ids[row, n:].tolist() == [PAD] * (width - n)
            assert mask[row].tolist() == [1] * n + [0] * (width - n)
        else:
            assert ids[row, width - n :].tolist() == real
            assert ids[row, : width - n].tolist() == [PAD] * (width - n)
            assert mask[row].tolist() == [0] * (width - n) + [1] * n
    assert tok.padding_side == "right"  # asking for a side does not change the tokenizer


def test_to_tokens_default_side_follows_the_tokenizer():
    left_tok = tiny_tokenizer(padding_side="left")
    batch = T.to_tokens(left_tok, ["a cat", "The quick brown fox"])
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][0, 0] == 0


def test_to_str_tokens_matches_decode(tok):
    m = model()
    ids = tok(IOI)["input_ids"]
    strs = m.to_str_tokens(IOI)
    assert strs == [tok.decode([i]) for i in ids]
    assert strs[0] == "<bos>"
    assert "".join(strs[1:]) == IOI  # byte-level pieces reassemble the text
    assert " Mary" in strs and " John" in strs
    as_tensor = torch.tensor(ids)
    assert m.to_str_tokens(as_tensor) == strs
    assert m.to_str_tokens(as_tensor[None]) == strs
    assert m.to_str_tokens(ids) == strs
    assert m.to_str_tokens(IOI, add_special_tokens=False) == strs[1:]
    assert m.to_string(as_tensor[1:]) == IOI
    with pytest.raises(ConfigError, match=r"expected token ids of shape \[pos\] or \[1, pos\]; got \(2, 3\)"):
        m.to_str_tokens(torch.zeros(2, 3, dtype=torch.long))


def test_to_single_token(tok):
    m = model()
    paris = m.to_single_token(" Paris")
    assert paris == tok.convert_tokens_to_ids("ĠParis")
    assert m.to_string([paris]) == " Paris"
    assert m.to_str_tokens(TEXT)[-1] == " Paris"
    assert m.to_tokens(TEXT)["input_ids"][0, -1] == paris
    with pytest.raises(ConfigError) as info:
        m.to_single_token(" France")
    message = str(info.value)
    assert "expected ' France' to be a single token; it is 4 tokens" in message
    assert "[' ', 'Fr', 'an', 'ce']" in message
    with pytest.raises(ConfigError, match="it is 0 tokens"):
        m.to_single_token("")


@pytest.mark.parametrize(
    "text,sub,occurrence,expected",
    [
        (TEXT, " Paris", 0, [" Paris"]),
        (TEXT, "Paris", 0, [" Paris"]),  # the token that holds it
        (TEXT, " France", 0, [" ", "Fr", "an", "ce"]),
        (TEXT, "France", 0, ["Fr", "an", "ce"]),
        (TEXT, "apit", 0, [" capital"]),
        (TEXT, "The", 0, ["The"]),
        (IOI, " John", 0, [" John"]),
        (IOI, " John", 1, [" John"]),
        (IOI, "Mary", 1, [" Mary"]),
        (IOI, "store, John", 0, [" s", "t", "or", "e", ",", " John"]),
    ],
)
def test_find_positions(text, sub, occurrence, expected):
    m = model()
    positions = m.find_positions(text, sub, occurrence=occurrence)
    strs = m.to_str_tokens(text)
    assert [strs[p] for p in positions] == expected
    assert positions == list(range(positions[0], positions[-1] + 1))  # contiguous


def test_find_positions_occurrences_are_distinct():
    m = model()
    first = m.find_positions(IOI, " John", occurrence=0)
    second = m.find_positions(IOI, " John", occurrence=1)
    assert first != second and first[0] < second[0]
    with pytest.raises(ConfigError, match=r"substring ' John' \(occurrence 2\) not found"):
        m.find_positions(IOI, " John", occurrence=2)
    with pytest.raises(ConfigError, match="substring 'Berlin'"):
        m.find_positions(TEXT, "Berlin")


def test_find_positions_cover_any_substring():
    """For random substrings, the tokens at the returned positions, joined, contain the substring and
    dropping either end token would not."""
    m = model()
    rng = random.Random(0)
    for _ in range(60):
        text = rng.choice(SENTENCES)
        start = rng.randrange(len(text) - 1)
        end = rng.randrange(start + 1, min(len(text), start + 12) + 1)
        sub = text[start:end]
        occurrence, found = 0, text.find(sub)
        while found != start:  # which occurrence of `sub` starts at `start`
            occurrence, found = occurrence + 1, text.find(sub, found + 1)
        positions = m.find_positions(text, sub, occurrence=occurrence)
        strs = m.to_str_tokens(text)
        joined = "".join(strs[p] for p in positions)
        assert sub in joined, (text, sub, positions)
        if len(positions) > 1:
            assert sub not in "".join(strs[p] for p in positions[1:])
            assert sub not in "".join(strs[p] for p in positions[:-1])


def test_position_ids_from_mask():
    right = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert T.position_ids_from_mask(right) is None
    left = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    assert T.position_ids_from_mask(left).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]


def test_ensure_pad_token_uses_eos():
    tok = tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token is None
    T.ensure_pad_token(tok)
    assert tok.pad_token == "<eos>"
    batch = T.to_tokens(tok, ["a", "the dog"])
    assert int(batch["input_ids"][0, -1]) == tok.eos_token_id


def test_token_helpers_drive_the_model():
    """Positions from find_positions index the same tokens the model sees."""
    m = model()
    pos = m.find_positions(TEXT, " Paris")
    _, cache = m.run_with_cache(TEXT, sites=["hook_embed"], positions=pos)
    w_e = m.weights.W_E
    torch.testing.assert_close(cache["hook_embed"][0, 0], w_e[m.to_single_token(" Paris")], atol=0, rtol=0)


def test_special_ids_are_the_named_special_tokens_and_every_added_special_one():
    # Gemma 3's tokenizer names <pad>, <eos>, <bos>, <unk>, <mask> but adds <start_of_turn>, <unused0>.. and image
    # markers as special added tokens, which all_special_ids does not list.
    from tokenizers import AddedToken

    tokenizer = tiny_tokenizer()
    named = sorted(tokenizer.all_special_ids)
    assert T.special_ids(tokenizer) == named and T.special_ids(None) == []
    tokenizer.add_tokens([AddedToken("<start_of_turn>", special=True), AddedToken("<b>", special=False)])
    turn, bold = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<b>"])
    assert turn not in tokenizer.all_special_ids
    assert T.special_ids(tokenizer) == sorted([*named, turn]) and bold not in T.special_ids(tokenizer)


def test_special_prefix_is_what_the_tokenizer_puts_before_text():
    assert T.special_prefix(tiny_tokenizer()) == [BOS]  # the tiny tokenizer prepends <bos>, as Gemma's does
    from tokenizers import Tokenizer

    plain_backend = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    plain_backend.post_processor = None  # a GPT-2-style tokenizer: nothing before the text
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=plain_backend, bos_token="<bos>")
    assert T.special_prefix(plain) == []


def test_a_text_that_already_starts_with_the_bos_does_not_get_it_twice():
    # A chat template writes the BOS itself (Gemma's does); such a text is encoded as it is, the others get it.
    tok = tiny_tokenizer()
    started, plain = "<bos>The dog sat", "The dog sat"
    for side in ("left", "right"):
        batch = T.to_tokens(tok, [started, plain, "A cat"], padding_side=side)
        assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
        assert int((batch["input_ids"][0] == BOS).sum()) == 1
        one = T.to_tokens(tok, "A cat", padding_side=side)["input_ids"][0]
        row = batch["input_ids"][2][batch["attention_mask"][2].bool()]
        assert torch.equal(row, one)  # the other texts as before, padded on the asked side
        assert bool(batch["attention_mask"][2, 0 if side == "right" else -1])
    assert T.encode(tok, started) == T.encode(tok, plain) == T.to_tokens(tok, plain)["input_ids"][0].tolist()
    assert T.find_positions(tok, started, " dog") == T.find_positions(tok, plain, " dog")
    assert T.to_str_tokens(tok, started) == T.to_str_tokens(tok, plain)
    assert T.encode(tok, started, add_special_tokens=False) == T.encode(tok, plain)  # its own BOS stays


def test_text_mask_leaves_out_each_rows_leading_bos_only():
    tok = tiny_tokenizer()
    for side in ("left", "right"):
        batch = T.to_tokens(tok, ["The cat sat on the mat", "A cat", ""], padding_side=side)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        text = T.text_mask(tok, ids, mask)
        assert text.dtype == mask.dtype and bool((text <= mask).all())
        assert int(text[0].sum()) == int(mask[0].sum()) - 1 and int(text[1].sum()) == int(mask[1].sum()) - 1
        assert not bool((ids[:2][text[:2].bool()] == BOS).any())
        assert torch.equal(text[2], mask[2])  # a row that is only its BOS keeps it (a mean needs a token)
    plain = torch.tensor([[5, 6, 7]])  # ids that do not start with the BOS: nothing is left out
    assert torch.equal(T.text_mask(tok, plain, torch.ones_like(plain)), torch.ones_like(plain))
