"""Edit requests: "in `prompt`, `subject` should now lead to `target`", validated before any weight moves.

A request's prompt carries a ``{}`` placeholder where the subject goes (``"{} lives in the city of"``),
so the subject's last token -- where ROME and MEMIT write the new association -- is located exactly
from character offsets instead of guessed from token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mechscope.errors import ConfigError

if TYPE_CHECKING:
    from mechscope.data.tasks.world import World


class EditError(ConfigError):
    """An edit that cannot be made as asked (bad request, bad statistics); the model is left unmodified."""


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """One fact to write: the prompt with the subject filled in should be followed by `target`.

    Args:
        prompt: text with exactly one ``{}`` where the subject goes, ending right before the target
            (a prompt without ``{}`` that contains the subject is converted at its first occurrence).
        subject: the entity whose association is rewritten (its last token is the edit's key).
        target: the new continuation, normally starting with a space (``" Norwent"``).
        paraphrases: other full prompts (subject already filled in) that should also give `target`.
        neighbours: ``(prompt, answer)`` pairs about *other* subjects whose answers must not change.
    """

    prompt: str
    subject: str
    target: str
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise EditError(f"an edit needs a non-empty subject; got {self.subject!r}")
        if not isinstance(self.prompt, str):
            raise EditError(f"an edit prompt must be a string; got {type(self.prompt).__name__}")
        if "{}" not in self.prompt:
            if self.subject not in self.prompt:
                raise EditError(
                    f"the subject {self.subject!r} is not in the prompt {self.prompt!r}; write the prompt with "
                    "'{}' where the subject goes (e.g. '{} lives in the city of') or include the subject"
                )
            object.__setattr__(self, "prompt", self.prompt.replace(self.subject, "{}", 1))
        if self.prompt.count("{}") != 1:
            raise EditError(
                f"an edit prompt must contain exactly one '{{}}' where the subject goes "
                f"(e.g. '{{}} lives in the city of'); got {self.prompt!r}"
            )
        if not isinstance(self.target, str) or not self.target.strip():
            raise EditError(f"an edit needs a non-empty target (e.g. ' Paris'); got {self.target!r}")
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "neighbours", tuple((str(p), str(a)) for p, a in self.neighbours))
        for text in self.paraphrases:
            if self.subject not in text:
                raise EditError(
                    f"paraphrase {text!r} does not contain the subject {self.subject!r}; paraphrases are full "
                    "prompts with the subject written out"
                )

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target": self.target,
            "paraphrases": list(self.paraphrases),
            "neighbours": [list(n) for n in self.neighbours],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        missing = {"prompt", "subject", "target"} - set(data)
        if missing:
            raise EditError(f"an edit request needs keys prompt, subject, target; missing {sorted(missing)}")
        return cls(
            prompt=data["prompt"],
            subject=data["subject"],
            target=data["target"],
            paraphrases=tuple(data.get("paraphrases", ())),
            neighbours=tuple(tuple(n) for n in data.get("neighbours", ())),  # type: ignore[misc]
        )


def subject_last_position(tokenizer: Any, text: str, subject: str, *, from_end: bool = False) -> int:
    """Index of the token that covers the last character of `subject` in `text` (no special tokens).

    With ``from_end`` the last occurrence of the subject is used (prefixes may mention other words).
    """
    start = text.rfind(subject) if from_end else text.find(subject)
    if start < 0:
        raise EditError(f"the subject {subject!r} does not occur in {text!r}")
    last_char = start + len(subject) - 1
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for i, (a, b) in enumerate(encoded["offset_mapping"]):
        if a <= last_char < b:
            return i
    raise EditError(f"no token of {text!r} covers the end of the subject {subject!r}")


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """Token ids of `target` (no special tokens); :class:`EditError` when it tokenises to nothing."""
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EditError(f"the target {target!r} tokenises to no tokens; give a target with visible text")
    return [int(i) for i in ids]


def check_requests(tokenizer: Any, requests: Sequence[EditRequest]) -> None:
    """Validate requests against a tokenizer before any weight is touched."""
    if tokenizer is None:
        raise EditError("editing needs the model's tokenizer; load the model with one")
    if not requests:
        raise EditError("expected at least one EditRequest; got none")
    for req in requests:
        if not isinstance(req, EditRequest):
            raise EditError(f"expected EditRequest objects; got {type(req).__name__}")
        subject_last_position(tokenizer, req.text, req.subject)
        target_ids(tokenizer, req.target)


def world_requests(
    n: int,
    *,
    seed: int = 0,
    relation: str | None = None,
    n_neighbours: int = 5,
    offset: int = 0,
    world: World | None = None,
) -> list[EditRequest]:
    """`n` counterfactual requests about the organisms' synthetic world (:mod:`mechscope.data.tasks.world`).

    Each request moves one entity's fact to another value of the same relation, stated with a training
    template; its paraphrases are the relation's held-out templates and its neighbours are the same
    relation asked about other entities (with their true answers). Entities are taken in world order
    from `offset`, relations cycle unless `relation` is given. Deterministic in `seed`. `world` defaults
    to the full organisms' (``make_world(seed)``); organism-facts knows ``make_family_world(seed)``.
    """
    from mechscope.data.tasks.base import task_rng
    from mechscope.data.tasks.world import RELATIONS, make_world

    world = world if world is not None else make_world(seed)
    rels = [r for r in RELATIONS if relation is None or r.name == relation]
    if not rels:
        raise EditError(f"unknown relation {relation!r}; expected one of {[r.name for r in RELATIONS]}")
    if not 0 < n <= len(world.entities) - offset:
        raise EditError(f"expected 1 <= n <= {len(world.entities) - offset} requests; got {n}")
    rng = task_rng(seed, "edit-requests", str(offset))
    out: list[EditRequest] = []
    entities = world.entities
    for i in range(n):
        entity = entities[offset + i]
        rel = rels[i % len(rels)]
        old = world.facts[entity][rel.name]
        new = rng.choice([v for v in rel.values if v != old])
        template = rel.train_templates[0]
        others = [e for e in entities if e != entity]
        picked = rng.sample(others, n_neighbours)
        out.append(
            EditRequest(
                prompt=template.replace("{e}", "{}"),
                subject=entity,
                target=" " + new,
                paraphrases=tuple(t.format(e=entity) for t in rel.heldout_templates),
                neighbours=tuple((template.format(e=o), " " + world.facts[o][rel.name]) for o in picked),
            )
        )
    return out


__all__ = [
    "EditError",
    "EditRequest",
    "check_requests",
    "subject_last_position",
    "target_ids",
    "world_requests",
]
