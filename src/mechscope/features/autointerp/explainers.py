"""Explainers: from a feature's examples to a short description and a prediction of its output effect.

An explainer is anything with ``explain(examples) -> Explanation`` (:class:`Explainer`). Built in:

- :class:`TokenStatsExplainer`: no language model. Describes which tokens the feature fires on (the most
  frequent activating tokens, with their share of the top activations) and which tokens precede them; it
  predicts the output effect from the tokens that follow its top activations in the corpus.
- :class:`ChatExplainer`: any text-completion callable writes the description from a prompt listing the
  contexts with the active token marked; :class:`TransformersChat` (a local instruct model, e.g.
  SmolLM2-135M-Instruct) and :class:`OpenAIChat` (any OpenAI-compatible ``/v1/chat/completions``
  endpoint the user runs: llama.cpp, vLLM; with timeouts) are the two completers shipped.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mechscope.errors import ConfigError, MechscopeError
from mechscope.features.autointerp.examples import Context, FeatureExamples


class ExplainerError(MechscopeError):
    """An explainer or judge backend failed (unreachable endpoint, timeout, malformed reply)."""


@dataclass(frozen=True)
class Explanation:
    """A description, the tokens it says the feature fires on (``keywords``, for the baseline judge) and
    the tokens it predicts the feature makes more likely next (``predicted``, for causal scoring)."""

    text: str
    keywords: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)


class Explainer(Protocol):
    def explain(self, examples: FeatureExamples) -> Explanation: ...


def token_key(token: str) -> str:
    """How descriptions name a token: stripped and lower-cased, except a whitespace-only token (a newline,
    an indent), which keeps its characters so that it stays nameable and distinct; ``""`` only for ``""``."""
    return token.strip().lower() or token


@dataclass(frozen=True, kw_only=True)
class TokenStatsExplainer:
    """The no-LLM baseline (see the module docstring)."""

    n_tokens: int = 4
    n_predicted: int = 5

    def explain(self, examples: FeatureExamples) -> Explanation:
        ctx = examples.explain
        if not ctx:
            return Explanation("never fires on this corpus")
        # token_key(t) is empty only for an empty t, so testing t itself is the same filter.
        active = Counter(token_key(c.tokens[-1]) for c in ctx if c.tokens[-1])
        before = Counter(token_key(c.tokens[-2]) for c in ctx if len(c.tokens) > 1 and c.tokens[-2])
        after = Counter(token_key(c.next_token) for c in ctx if c.next_token)
        keywords = [t for t, _ in active.most_common(self.n_tokens)]
        share = sum(active[t] for t in keywords) / len(ctx)
        text = f"fires on {', '.join(repr(t) for t in keywords)} ({share:.0%} of top activations)"
        if before:
            text += f", often after {', '.join(repr(t) for t, _ in before.most_common(2))}"
        predicted = [t for t, _ in after.most_common(self.n_predicted)]
        return Explanation(text, keywords, predicted)


def _prompt(examples: FeatureExamples) -> str:
    lines = [
        "Below are text excerpts where one feature of a language model is active; the token where it is",
        "most active is marked with << >>. In one short sentence, say what the feature detects. Then, on",
        "a line starting with 'Next:', list up to 5 words likely to come right after the marked token.",
        "",
    ]
    for i, c in enumerate(examples.explain[:10], 1):
        lines.append(f"{i}. {''.join(c.tokens[:-1])}<<{c.tokens[-1]}>>")
    lines.append("")
    lines.append("Feature:")
    return "\n".join(lines)


def _parse(reply: str) -> Explanation:
    text, predicted = reply.strip(), []
    match = re.search(r"(?im)^\s*next\s*:\s*(.*)$", text)
    if match:
        predicted = [w.strip(" '\"`.") for w in re.split(r"[,;]", match.group(1)) if w.strip(" '\"`.")][:5]
        text = text[: match.start()].strip()
    lines = [re.sub(r"^\s*(\d+[.)]|[-*]|feature\s*:)\s*", "", ln, flags=re.I).strip() for ln in text.splitlines()]
    text = next((ln for ln in lines if ln), "")
    keywords = [w.lower() for w in re.findall(r"['\"]([^'\"]+)['\"]", text)]
    return Explanation(text or "(no description)", keywords, predicted)


@dataclass(frozen=True)
class ChatExplainer:
    """Descriptions written by `complete` (a callable from a prompt to its completion)."""

    complete: Callable[[str], str]

    def explain(self, examples: FeatureExamples) -> Explanation:
        if not examples.explain:
            return Explanation("never fires on this corpus")
        return _parse(self.complete(_prompt(examples)))


@dataclass
class OpenAIChat:
    """A completer backed by an OpenAI-compatible chat endpoint (``base_url`` like
    ``http://127.0.0.1:8080/v1``); every request has a timeout, and failures are :class:`ExplainerError`."""

    base_url: str
    model: str = "local"
    timeout: float = 30.0
    max_tokens: int = 80
    api_key: str = ""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"expected an http(s) base_url, got {self.base_url!r}")
        if self.timeout <= 0:
            raise ConfigError(f"expected a positive timeout, got {self.timeout}")

    def __call__(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply: Any = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ExplainerError(f"explainer endpoint {self.base_url} unreachable or timed out ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise ExplainerError(f"explainer endpoint {self.base_url} sent malformed JSON ({exc})") from exc
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise ExplainerError(f"explainer endpoint {self.base_url}: unexpected reply {str(reply)[:200]}") from exc


@dataclass
class TransformersChat:
    """A completer backed by a local causal LM with a chat template (greedy decoding)."""

    model: Any  # a HookedModel or anything with .hf_model and .tokenizer
    max_new_tokens: int = 60

    def __call__(self, prompt: str) -> str:
        import torch

        tok, hf = self.model.tokenizer, self.model.hf_model
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        ids = tok(text, return_tensors="pt").input_ids.to(next(hf.parameters()).device)
        with torch.no_grad():
            out = hf.generate(
                ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def explain_contexts(contexts: list[Context]) -> str:
    """The contexts as the prompt shows them (for users writing their own explainers)."""
    return "\n".join(f"{''.join(c.tokens[:-1])}<<{c.tokens[-1]}>>" for c in contexts)


__all__ = [
    "ChatExplainer",
    "Explainer",
    "ExplainerError",
    "Explanation",
    "OpenAIChat",
    "TokenStatsExplainer",
    "TransformersChat",
    "explain_contexts",
]
