"""Chat prompts in a model's own template, greedy replies, and a documented refusal detector.

Instruct models (SmolLM2-135M-Instruct) behave as trained only inside their chat template; a bare
instruction is out of distribution. :func:`format_chat` renders messages with the tokenizer's own
Jinja template (``tokenizer.apply_chat_template``), :func:`chat_inputs` tokenises a batch of them
(left-padded, no extra special tokens: the template already writes them), and :func:`generate_replies`
gives greedy replies. Refusal measurement (the detector, refusal rates, the refusal score and the chat
refusal task) lives in :mod:`mechscope.improve.refusal`; the bundled prompt sets in
:mod:`mechscope.data.prompt_sets`. Their old names here still work, with a deprecation warning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.errors import ConfigError

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ConfigError):
    """A tokenizer without a chat template, or messages the template cannot render."""


def _tokenizer(model_or_tokenizer: Any) -> Any:
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tok is None or not hasattr(tok, "apply_chat_template"):
        raise ChatTemplateError(
            f"expected a HookedModel with a tokenizer or an HF tokenizer; got {type(model_or_tokenizer).__name__}"
        )
    return tok


def has_chat_template(model_or_tokenizer: Any) -> bool:
    """Whether the model's tokenizer carries a chat template."""
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    return bool(getattr(tok, "chat_template", None))


def as_messages(prompt: str | Sequence[Mapping[str, str]], *, system: str | None = None) -> list[dict[str, str]]:
    """A user instruction (str) or a message list, validated, with an optional system message first."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and prompt:
        messages = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
                raise ChatTemplateError(f"message {i} must be a mapping with keys 'role' and 'content'; got {m!r}")
            if m["role"] not in ROLES or not isinstance(m["content"], str):
                raise ChatTemplateError(
                    f"message {i}: role must be one of {ROLES} and content a string; got {m['role']!r}, "
                    f"{type(m['content']).__name__}"
                )
            messages.append({"role": str(m["role"]), "content": str(m["content"])})
    else:
        raise ChatTemplateError(f"expected an instruction string or a non-empty list of messages; got {prompt!r}")
    if system is not None:
        if messages[0]["role"] == "system":
            raise ChatTemplateError("system= given but the messages already start with a system message")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def format_chat(
    model_or_tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """`prompt` (an instruction or messages) rendered with the model's own chat template, as text.

    With ``add_generation_prompt`` the text ends where the assistant's reply begins. A template's
    default system message (SmolLM2 adds one) is kept unless `system` replaces it.
    """
    tok = _tokenizer(model_or_tokenizer)
    if not has_chat_template(tok):
        raise ChatTemplateError(
            f"the tokenizer {type(tok).__name__} has no chat template (a base model?); format the prompt yourself "
            "or load an instruct model such as 'smollm2-135m-instruct'"
        )
    messages = as_messages(prompt, system=system)
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own errors for templates that reject a message order
        raise ChatTemplateError(f"the chat template rejected the messages: {type(exc).__name__}: {exc}") from exc
    return str(text)


def format_instructions(
    model_or_tokenizer: Any, instructions: Sequence[str], *, system: str | None = None
) -> list[str]:
    """Each instruction as a one-turn chat ending at the assistant's turn."""
    if isinstance(instructions, str) or not instructions:
        raise ChatTemplateError("expected a non-empty list of instruction strings")
    return [format_chat(model_or_tokenizer, text, system=system) for text in instructions]


def chat_inputs(
    model_or_tokenizer: Any, instructions: Sequence[str], *, system: str | None = None
) -> dict[str, Int[Tensor, "batch pos"]]:
    """Tokenised chat prompts, left-padded so every prompt ends at the last position."""
    from mechscope.model.tokens import to_tokens

    tok = _tokenizer(model_or_tokenizer)
    texts = format_instructions(tok, instructions, system=system)
    return to_tokens(tok, texts, padding_side="left", add_special_tokens=False)


@torch.no_grad()
def generate_replies(
    model: HookedModel,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    system: str | None = None,
) -> list[str]:
    """Greedy replies (new text only, special tokens dropped) to each instruction in the chat template."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens and batch_size must be >= 1; got {max_new_tokens}, {batch_size}")
    tok = _tokenizer(model)
    replies: list[str] = []
    for start in range(0, len(instructions), batch_size):
        batch = chat_inputs(tok, list(instructions[start : start + batch_size]), system=system)
        out = model.generate(batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[:, batch["input_ids"].shape[1] :]
        replies += [str(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
    return replies


#: Names that moved out of this module: name -> new module (deprecated here, still importable).
_MOVED = {
    **dict.fromkeys(
        ("REFUSAL_MARKERS", "REFUSAL_WINDOW", "RefusalResult", "is_refusal", "refusal_rate"),
        "mechscope.improve.refusal",
    ),
    **dict.fromkeys(("PROMPT_SETS", "PromptSetError", "load_prompt_set"), "mechscope.data.prompt_sets"),
}


def __getattr__(name: str) -> Any:
    """Deprecated names that moved to higher layers (refusal measurement, prompt sets), loaded lazily."""
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(
            f"mechscope.model.chat.{name} moved to {_MOVED[name]}.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ChatTemplateError",
    "as_messages",
    "chat_inputs",
    "format_chat",
    "format_instructions",
    "generate_replies",
    "has_chat_template",
]
