"""Tokenisation helpers that agree with the model's own tokenizer (special tokens included).

Batches are padded on the side the tokenizer says (``tokenizer.padding_side``) unless asked otherwise;
:meth:`HookedModel.forward` derives position ids from the attention mask, so left padding gives the same
activations at real tokens as running each prompt alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError


def ensure_pad_token(tokenizer: Any) -> None:
    """Give tokenizers without a pad token (GPT-2) their EOS token as pad, as HF's docs recommend."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token


def to_tokens(
    tokenizer: Any,
    text: str | Sequence[str],
    *,
    padding_side: str | None = None,
    add_special_tokens: bool = True,
) -> dict[str, Tensor]:
    """Tokenise one text or a batch: ``{"input_ids": [batch, pos], "attention_mask": [batch, pos]}``.

    A text that already starts with what the tokenizer puts before text (a chat template's ``<bos>``, as
    Gemma's writes it) does not get it twice: ``add_special_tokens`` applies to the other texts only.
    """
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, Sequence) and all(isinstance(t, str) for t in text) and len(text) > 0:
        texts = list(text)
    else:
        inner = f" of {type(text[0]).__name__}" if isinstance(text, Sequence) and len(text) > 0 else ""
        raise ConfigError(f"expected a string or a non-empty list of strings; got {type(text).__name__}{inner}")
    if padding_side not in (None, "left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    ensure_pad_token(tokenizer)
    kwargs: dict[str, Any] = {
        "padding": True,
        "return_tensors": "pt",
        "add_special_tokens": add_special_tokens,
    }
    if padding_side is not None:
        kwargs["padding_side"] = padding_side
    started = _already_started(tokenizer, texts) if add_special_tokens else [False] * len(texts)
    if not any(started):
        encoded = tokenizer(texts, **kwargs)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    ids = [encode(tokenizer, t) for t in texts]
    return pad_rows(ids, int(tokenizer.pad_token_id), padding_side or tokenizer.padding_side)


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """The ids of one text exactly as :func:`to_tokens` writes them (no BOS added to a text that has one)."""
    adds = add_special_tokens and not _already_started(tokenizer, [text])[0]
    return [int(i) for i in tokenizer(text, add_special_tokens=adds)["input_ids"]]


def _already_started(tokenizer: Any, texts: list[str]) -> list[bool]:
    """Which `texts` begin with the text of the tokenizer's :func:`special_prefix` (e.g. a chat template's BOS)."""
    prefix = special_prefix(tokenizer)
    if not prefix:
        return [False] * len(texts)
    start = tokenizer.decode(prefix)
    return [bool(start) and t.startswith(start) for t in texts]


def pad_rows(ids: Sequence[Sequence[int]], pad: int, side: str = "right") -> dict[str, Tensor]:
    """Token id lists as one padded batch: ``{"input_ids", "attention_mask"}``, each ``[rows, longest]``."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def to_str_tokens(
    tokenizer: Any, tokens: str | Tensor | Sequence[int], *, add_special_tokens: bool = True
) -> list[str]:
    """Each token of one sequence as its decoded string (``" Paris"``), in order."""
    if isinstance(tokens, str):
        ids = encode(tokenizer, tokens, add_special_tokens=add_special_tokens)
    elif isinstance(tokens, Tensor):
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ConfigError(f"expected token ids of shape [pos] or [1, pos]; got {tuple(tokens.shape)}")
        ids = tokens.tolist()
    else:
        ids = list(tokens)
    return [tokenizer.decode([i]) for i in ids]


def special_ids(tokenizer: Any) -> list[int]:
    """Every special token id of `tokenizer`, sorted: its named ones (BOS, EOS, pad, ...) and each added token
    flagged special. Gemma 3 names 5 but adds 6,249 more (``<start_of_turn>``, ``<unused...>``, image markers):
    control tokens, not text. None without a tokenizer."""
    if tokenizer is None:
        return []
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return sorted(ids)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids `tokenizer` puts before any text: a BOS token for Gemma and Llama tokenizers, none for
    GPT-2-style ones (nor without a tokenizer). Token sequences built by hand should start with them, as the
    model's text does (Gemma-3-270M's loss on repeated random tokens is 2.5 nats with its BOS and 9.1 without)."""
    if tokenizer is None:
        return []
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    return []


TEXT_CHUNK = 256  # texts tokenised at a time by packed_rows


def packed_rows(tokenizer: Any, texts: Iterable[str], seq_len: int) -> Iterator[list[int]]:
    """Rows of `seq_len` token ids packed from `texts`, streamed, the way training pipelines pack text.

    Each row starts with :func:`special_prefix` (the tokenizer's BOS where it puts one before text; nothing for
    GPT-2-style tokenizers), so the model reads every row as it reads text, and goes on with the next tokens
    of the texts joined by end-of-text (the pad token where there is none). No padding: every token is real.
    """
    prefix = special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 2:
        raise ConfigError(
            f"expected seq_len >= {len(prefix) + 2} (the tokenizer's start {prefix} and two tokens), got {seq_len}"
        )
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    stream: list[int] = []
    chunk: list[str] = []
    for text in itertools.chain(texts, [None]):
        if text is not None:
            chunk.append(text)
            if len(chunk) < TEXT_CHUNK:
                continue
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else []:
            stream += [*ids, *(() if sep is None else (int(sep),))]
        chunk = []
        while len(stream) >= body:
            yield prefix + stream[:body]
            stream = stream[body:]


def text_mask(tokenizer: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """`attention_mask` without each row's leading :func:`special_prefix` tokens (the BOS): the tokens of the
    text itself, over which per-token means are taken. Gemma-3-270M's BOS residual is 14x a text token's
    (layer 9), so a mean that counts it is mostly BOS. A row that is only its BOS keeps it."""
    prefix = special_prefix(tokenizer)
    if not prefix:
        return attention_mask
    real = attention_mask.bool()
    order = real.long().cumsum(-1) - 1  # index of each token among its row's real tokens
    start = torch.zeros_like(real)
    for j, token in enumerate(prefix):
        start |= real & (order == j) & (input_ids.to(real.device) == token)
    start &= (real & ~start).any(-1, keepdim=True)
    return (real & ~start).to(attention_mask.dtype)


def prefix_mask(tokenizer: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[batch, pos] bool: each row's leading :func:`special_prefix` tokens (its BOS), wherever padding puts
    them -- the real tokens :func:`text_mask` leaves out."""
    return attention_mask.bool() & ~text_mask(tokenizer, input_ids, attention_mask).bool()


def row_positions_mask(attention_mask: Tensor, positions: Iterable[int]) -> Tensor:
    """[batch, pos] bool: `positions` counted in each row's own real tokens -- negative from its last, non-negative
    from its first -- wherever padding puts them; a row too short for a position has none for it."""
    real = attention_mask.bool()
    order = real.long().cumsum(-1) - 1  # each real token's index in its row
    from_end = order - real.sum(-1, keepdim=True)  # -1 at the row's last real token
    chosen = torch.zeros_like(real)
    for p in positions:
        chosen |= real & ((order == p) if p >= 0 else (from_end == p))
    return chosen


def leading_mask(attention_mask: Tensor, count: int) -> Tensor:
    """[batch, pos] bool: each row's first `count` real tokens, wherever padding puts them."""
    real = attention_mask.bool()
    return real & (real.long().cumsum(-1) <= count)


def to_single_token(tokenizer: Any, text: str) -> int:
    """The id of `text` if it is exactly one token (e.g. ``" Paris"``); a clear error otherwise."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ConfigError(f"expected {text!r} to be a single token; it is {len(ids)} tokens: {pieces}")
    return int(ids[0])


def find_positions(
    tokenizer: Any, text: str, substring: str, *, occurrence: int = 0, add_special_tokens: bool = True
) -> list[int]:
    """Token positions (in ``to_tokens(text)``) covering the `occurrence`-th match of `substring`."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.find(substring, start + 1)
        if start < 0:
            raise ConfigError(f"substring {substring!r} (occurrence {occurrence}) not found in {text!r}")
    end = start + len(substring)
    adds = add_special_tokens and not _already_started(tokenizer, [text])[0]  # as to_tokens encodes it
    encoded = tokenizer(text, add_special_tokens=adds, return_offsets_mapping=True)
    positions = [
        i
        for i, (a, b) in enumerate(encoded["offset_mapping"])
        if b > a and a < end and b > start  # overlaps [start, end)
    ]
    if not positions:
        raise ConfigError(f"no token of {text!r} overlaps {substring!r}")
    return positions


def position_ids_from_mask(attention_mask: Tensor) -> Tensor | None:
    """Position ids that skip left padding; None when no row is left-padded (HF's default is right)."""
    if bool((attention_mask[:, 0] == 1).all()):
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def as_batch(tokens: Tensor) -> Tensor:
    """[pos] -> [1, pos]; [batch, pos] unchanged; anything else is an error."""
    if not isinstance(tokens, Tensor):
        raise ConfigError(f"expected token ids as a tensor of shape [pos] or [batch, pos]; got {type(tokens).__name__}")
    if tokens.ndim not in (1, 2):
        raise ConfigError(f"expected token ids of shape [pos] or [batch, pos]; got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"expected integer token ids; got dtype {tokens.dtype}")
    if tokens.numel() == 0:
        raise ConfigError(f"expected at least one token; got token ids of shape {tuple(tokens.shape)}")
    return tokens[None] if tokens.ndim == 1 else tokens
