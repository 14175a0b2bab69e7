"""Distributed alignment search (DAS; Geiger et al. 2023): find the subspace that carries a causal variable.

Given pairs (base, source) and, for each, the output the model should give if a named high-level
variable took its value from the source (the counterfactual label), DAS learns an orthonormal basis
``Q`` (``[d_model, rank]``, the first `rank` directions of a learned rotation) at one site and position
such that the interchange intervention

    h_base <- h_base + Q Q^T (h_source - h_base)

makes the model produce the counterfactual label. The interchange-intervention accuracy (IIA) on
held-out pairs measures how well the subspace realises the variable; the same intervention with a
random subspace of equal rank is reported as a control.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.direction import Direction
from mechscope.errors import ConfigError, ShapeError
from mechscope.model.tokens import encode, special_prefix
from mechscope.results import Result
from mechscope.sites import Site


@dataclass(frozen=True, kw_only=True)
class DASConfig:
    """Options of :func:`das`.

    Args:
        site: a residual-width site (``blocks.{L}.hook_resid_post``, ``hook_attn_out``, ...).
        rank: dimension of the learned subspace.
        variable: the name of the causal variable the subspace should carry (recorded).
        steps, lr, batch_size: Adam training of the rotation on the training pairs.
        test_fraction: share of pairs held out to measure IIA.
        seed: initialisation, split and control subspace.
    """

    site: str
    rank: int = 8
    variable: str = "variable"
    steps: int = 200
    lr: float = 1e-2
    batch_size: int = 64
    test_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        Site.parse(self.site)
        for name in ("rank", "steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"DASConfig.{name} must be a positive integer; got {getattr(self, name)!r}")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"DASConfig.lr must be a finite number > 0; got {self.lr!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"DASConfig.test_fraction must be in (0, 1); got {self.test_fraction!r}")


class DASResult(Result):
    """The learned basis ``[d_model, rank]``, training losses ``[step]`` and IIA per split and subspace."""

    method: ClassVar[str] = "das"

    @property
    def basis(self) -> Float[Tensor, "d_model rank"]:
        return self.tensors["basis"]

    def iia(self, split: str = "test", subspace: str = "learned") -> float:
        """Interchange-intervention accuracy on `split` (train/test) with the learned or random subspace."""
        i = self.labels["split"].index(split)
        j = self.labels["subspace"].index(subspace)
        return float(self.tensors["iia"][i, j])

    def default_tensor(self) -> str:
        return "iia"

    def to_direction(self, model: Any) -> Direction:
        """The learned subspace as a :class:`~mechscope.direction.Direction` (rank = the DAS rank) for `model`,
        recording the site it was learned at and the variable it carries; ablate or steer it like any other."""
        site = Site.parse(self.config["site"])
        info = {
            "site": site.name,
            "layer": site.layer,
            "method": "das",
            "variable": self.config.get("variable"),
            "test_iia": self.iia("test"),
        }
        basis = self.basis.T  # [rank, d_model]
        return Direction.from_tensor(model, basis if basis.shape[0] > 1 else basis[0], **info)


@dataclass
class Pairs:
    """Interchange pairs: base and source prompts, the positions to intervene at, counterfactual labels.

    Positions index each prompt's tokens as ``model.to_tokens`` gives them: after the BOS where the tokenizer
    puts one before text (Gemma, Llama), as the model reads the prompt.
    """

    base: list[str]
    source: list[str]
    base_pos: list[int]
    source_pos: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        n = len(self.base)
        for name in ("source", "base_pos", "source_pos", "labels"):
            if len(getattr(self, name)) != n:
                raise ShapeError(f"Pairs.{name} has {len(getattr(self, name))} entries; expected {n} (one per base)")
        if n < 2:
            raise ConfigError(f"DAS needs at least 2 pairs (a training and a test part); got {n}")

    def subset(self, index: Sequence[int]) -> Pairs:
        return Pairs(
            *[[getattr(self, f)[i] for i in index] for f in ("base", "source", "base_pos", "source_pos", "labels")]
        )


def _encode(model: Any, texts: Sequence[str]) -> dict[str, Tensor]:
    return {
        k: v.to(model.device)
        for k, v in model.to_tokens(list(texts), padding_side="right").items()  # as text: BOS where added
    }


def _last(batch: dict[str, Tensor]) -> Int[Tensor, " batch"]:
    return batch["attention_mask"].sum(-1) - 1


def source_activations(model: Any, site: str, pairs: Pairs) -> Float[Tensor, "batch d_model"]:
    """The site's activation at each source prompt's intervention position."""
    layer = Site.parse(site).layer
    stop = layer + 1 if layer is not None and layer + 1 < model.dims.n_layers else None
    _, cache = model.run_with_cache(_encode(model, pairs.source), [site], stop_at_layer=stop)
    rows = torch.arange(len(pairs.source), device=model.device)
    return cache[site][rows, torch.tensor(pairs.source_pos, device=model.device)]


def interchange_logits(
    model: Any,
    basis: Float[Tensor, "d_model rank"],
    site: str,
    pairs: Pairs,
    source: Float[Tensor, "batch d_model"] | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token logits after each base prompt with the subspace `basis` taken from the source.

    `source` (from :func:`source_activations`) saves recomputing the source run.
    """
    h_src = source_activations(model, site, pairs) if source is None else source
    rows = torch.arange(len(pairs.base), device=model.device)
    base = _encode(model, pairs.base)
    pos = torch.tensor(pairs.base_pos, device=model.device)

    def swap(act: Tensor, _ctx: Any) -> Tensor:
        h = act[rows, pos]
        new = h + (h_src.to(h) - h) @ basis.to(h) @ basis.to(h).T
        return act.index_put((rows, pos), new)

    with model.hooks({site: swap}):
        logits = model.forward(base)
    return logits[rows, _last(base)]  # type: ignore[no-any-return]


def _iia(model: Any, basis: Tensor, site: str, pairs: Pairs, batch_size: int) -> float:
    hits = 0
    with torch.no_grad():
        for start in range(0, len(pairs.base), batch_size):
            part = pairs.subset(range(start, min(len(pairs.base), start + batch_size)))
            top = interchange_logits(model, basis, site, part).argmax(-1).cpu()
            hits += int((top == torch.tensor(part.labels)).sum())
    return hits / len(pairs.base)


def das(model: Any, pairs: Pairs, config: DASConfig) -> DASResult:
    """Learn a rank-``config.rank`` subspace at ``config.site`` realising the variable of `pairs`.

    Only the basis is trained (the model is untouched: parameters get no gradients and no updates).
    Returns the basis, the training loss per step and IIA on train/test for the learned subspace and
    for a random subspace of the same rank.
    """
    site = model.site(config.site).name
    d = model.dims.d_model
    if config.rank > d:
        raise ConfigError(f"DASConfig.rank={config.rank} exceeds the site's width d_model={d}")
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(pairs.base), generator=gen).tolist()
    n_test = max(1, round(config.test_fraction * len(order)))
    test, train = pairs.subset(order[:n_test]), pairs.subset(order[n_test:])
    if not train.base:
        raise ConfigError("no training pairs left after the test split; give more pairs")
    rotation: Any = nn.utils.parametrizations.orthogonal(nn.Linear(d, config.rank, bias=False))
    with torch.no_grad():
        rotation.weight = torch.linalg.qr(torch.randn(d, config.rank, generator=gen))[0].T.contiguous()
    rotation.to(model.device)
    optimiser = torch.optim.Adam(rotation.parameters(), lr=config.lr)
    with torch.no_grad():
        train_source = torch.cat(
            [
                source_activations(model, site, train.subset(range(i, min(len(train.base), i + config.batch_size))))
                for i in range(0, len(train.base), config.batch_size)
            ]
        )
    losses: list[float] = []
    for step in range(config.steps):
        idx = [(step * config.batch_size + i) % len(train.base) for i in range(min(config.batch_size, len(train.base)))]
        batch = train.subset(idx)
        with torch.enable_grad():
            basis = rotation.weight.T  # [d, rank], orthonormal columns
            logits = interchange_logits(model, basis, site, batch, train_source[idx])
            loss = nn.functional.cross_entropy(logits.float(), torch.tensor(batch.labels, device=logits.device))
            optimiser.zero_grad()
            loss.backward(inputs=list(rotation.parameters()))
            optimiser.step()
        losses.append(float(loss.detach()))
    learned = rotation.weight.T.detach().cpu()
    control = torch.linalg.qr(torch.randn(d, config.rank, generator=gen))[0]
    iia = torch.tensor(
        [[_iia(model, b, site, split, config.batch_size) for b in (learned, control)] for split in (train, test)]
    )
    return DASResult(
        tensors={"basis": learned.contiguous(), "losses": torch.tensor(losses), "iia": iia},
        axes={"basis": ("d_model", "rank"), "losses": ("step",), "iia": ("split", "subspace")},
        labels={"split": ["train", "test"], "subspace": ["learned", "random"]},
        config={
            **asdict(config),
            "n_train": len(train.base),
            "n_test": len(test.base),
            "dtype": str(model.dtype).removeprefix("torch."),
        },
    )


def world_pairs(model: Any, n: int, *, relation: str = "home_city", seed: int = 0) -> Pairs:
    """Interchange pairs for the organisms' planted facts: the variable is "the queried person's `relation`".

    Base and source ask the same template about two different people whose values differ and whose
    facts the model recalls correctly (so the counterfactual label, the source person's value, is
    well defined). Positions are each prompt's subject-last token.
    """
    from mechscope.data.tasks.base import task_rng
    from mechscope.data.tasks.metrics import next_token_predictions
    from mechscope.data.tasks.world import RELATIONS, make_world
    from mechscope.steer.editing.requests import subject_last_position

    world = make_world(seed)
    rel = next((r for r in RELATIONS if r.name == relation), None)
    if rel is None:
        raise ConfigError(f"unknown relation {relation!r}; expected one of {[r.name for r in RELATIONS]}")
    tk = model.tokenizer
    start = len(special_prefix(tk))  # positions count the BOS the model reads first, where there is one
    template = rel.train_templates[0]
    prompts = [template.format(e=e) for e in world.entities]
    preds = next_token_predictions(model.hf_model, tk, prompts)
    answers = [
        int(tk(" " + world.facts[e][relation], add_special_tokens=False)["input_ids"][0]) for e in world.entities
    ]
    known = [i for i, (p, a) in enumerate(zip(preds, answers, strict=True)) if p == a]
    rng = task_rng(seed, "das-pairs", relation)
    base: list[str] = []
    source: list[str] = []
    bpos: list[int] = []
    spos: list[int] = []
    labels: list[int] = []
    while len(base) < n and len(known) >= 2:
        i, j = rng.sample(known, 2)
        if answers[i] == answers[j]:
            continue
        ei, ej = world.entities[i], world.entities[j]
        base.append(prompts[i])
        source.append(prompts[j])
        bpos.append(start + subject_last_position(tk, prompts[i], ei))
        spos.append(start + subject_last_position(tk, prompts[j], ej))
        labels.append(answers[j])
    return Pairs(base, source, bpos, spos, labels)


def with_positions(pairs: Pairs, model: Any, where: str) -> Pairs:
    """`pairs` intervened at ``"subject"`` (as built) or at each prompt's ``"last"`` token."""
    if where == "subject":
        return pairs
    if where != "last":
        raise ConfigError(f"where must be 'subject' or 'last'; got {where!r}")
    tk = model.tokenizer
    lens = [len(encode(tk, t)) - 1 for t in pairs.base]  # as the model reads them (BOS where added)
    slens = [len(encode(tk, t)) - 1 for t in pairs.source]
    return Pairs(pairs.base, pairs.source, lens, slens, pairs.labels)


__all__ = [
    "DASConfig",
    "DASResult",
    "Pairs",
    "das",
    "interchange_logits",
    "source_activations",
    "with_positions",
    "world_pairs",
]
