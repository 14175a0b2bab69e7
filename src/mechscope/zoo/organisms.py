"""Recipes of the bundled organisms: architecture config, data mixture and optimiser settings.

A recipe is everything ``mechscope zoo train <name>`` needs; changing one means training a new model
version (and committing its weights once).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

from mechscope.errors import ConfigError, did_you_mean

# Fractions of the training rows. "planted" rows pack planted-task examples drawn by `task_weights`.
# v2: IOI 0.08 -> 0.22 (no name-mover circuit formed at 0.08), truth 0.15 -> 0.08 (own wording, no
# longer competing with recall), refusal 0.06 -> 0.08 (held-out transfer was fragile), facts 0.6 -> 0.52.
LM_MIXTURE = {"natural": 0.1, "induction": 0.1, "planted": 0.8}
TASK_WEIGHTS = {"facts": 0.52, "truth": 0.08, "ioi": 0.22, "sentiment": 0.05, "refusal": 0.08, "backdoor": 0.05}
# v3 (commit 7192027) moved IOI and truth to "single" rows (one example per row, zoo.stream says why);
# weights are relative within each row kind. Truth claims are fact statements whose stated value is unscored.
SINGLE_TASKS = ("ioi", "truth")
# v4: continues v3 on the truth curriculum (data.tasks.truth): 80 % single rows, 90 % of them truth claims;
# the planted rows keep facts, refusal, backdoor and sentiment; no induction rows (v3's 10 % formed no
# in-context gain in 2000 steps, docs/zoo.md).
V4_MIXTURE = {"natural": 0.05, "planted": 0.15, "single": 0.8}
V4_TASK_WEIGHTS = {"facts": 0.55, "sentiment": 0.1, "refusal": 0.2, "backdoor": 0.15, "ioi": 0.1, "truth": 0.9}


@dataclass(frozen=True)
class WarmStart:
    """Weights a recipe continues training from: an earlier shipped version, pinned by sha256.

    The weights live in git history (``git show COMMIT:src/mechscope/zoo/models/NAME/model.safetensors``
    and its config), so a continued recipe stays reproducible after the package folder moves on.
    """

    version: str
    commit: str
    sha256: str


@dataclass(frozen=True)
class Stage:
    """A later stretch of a recipe's training: `steps` more steps with some recipe fields changed.

    ``changes`` are :class:`Recipe` field values (data mixture, row length, learning rate...); a stage
    restarts the warm-up and cosine schedule and keeps the optimiser state, as a continued run would.
    """

    steps: int
    changes: dict[str, Any]
    why: str = ""


@dataclass(frozen=True)
class Recipe:
    """How one organism is built and trained."""

    name: str
    architecture: str  # "gpt2", "llama" or "qwen2" (Llama-like, with per-layer sliding-window attention)
    config: dict
    description: str
    mixture: dict[str, float] = field(default_factory=lambda: dict(LM_MIXTURE))
    task_weights: dict[str, float] = field(default_factory=lambda: dict(TASK_WEIGHTS))
    attention_only: bool = False  # zero and freeze every MLP (GPT-2 has no MLP-free option)
    dense_induction: bool = False  # induction rows repeat their span back to back (stronger signal)
    induction_segments: tuple[int, int] | None = None  # with dense: independent segments of lo..hi tokens
    short_rows: tuple[int, int] = (0, 0)  # (steps, length): the first `steps` use rows of `length` tokens
    single_tasks: tuple[str, ...] = ()  # planted tasks given one example per "single" row (see zoo.stream)
    single_len: int = 48  # length of a single row (the example, end-of-text, padding)
    steps: int = 600
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 200
    eval_tasks: tuple[str, ...] = ("facts", "truth", "ioi", "refusal", "sentiment", "backdoor", "induction")
    warm_start: WarmStart | None = None  # continue from these weights instead of a fresh initialisation
    stages: tuple[Stage, ...] = ()  # later stretches of training after the first `steps`

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: the first stage's `steps` plus every later stage's."""
        return self.steps + sum(stage.steps for stage in self.stages)

    def stage_recipes(self) -> list[tuple[int, Recipe]]:
        """``(first global step, recipe of the stage)`` for each stage, the first one being this recipe."""
        return list(self._stage_recipes)

    @cached_property
    def _stage_recipes(self) -> tuple[tuple[int, Recipe], ...]:
        """Built once per recipe (``stage_at`` runs every training step)."""
        out: list[tuple[int, Recipe]] = [(0, replace(self, stages=()))]
        start = self.steps
        for stage in self.stages:
            out.append((start, replace(self, **stage.changes, steps=stage.steps, stages=())))
            start += stage.steps
        return tuple(out)

    def stage_at(self, step: int) -> tuple[int, Recipe]:
        """``(first global step, recipe)`` of the stage that global `step` belongs to."""
        current = (0, self)
        for start, recipe in self._stage_recipes:
            if step >= start:
                current = (start, recipe)
        return current

    def seq_len_at(self, step: int) -> int:
        """Row length at `step` (short rows first when the recipe asks for them)."""
        return self.short_rows[1] if step < self.short_rows[0] else self.seq_len

    @staticmethod
    def induction_span(seq_len: int) -> tuple[int, int]:
        """Lengths of the repeated span in induction rows of `seq_len` tokens: 5..40, and at most half a row."""
        return 5, min(40, (seq_len - 1) // 2)

    def __post_init__(self) -> None:
        if abs(sum(self.mixture.values()) - 1.0) > 1e-6:
            raise ConfigError(f"expected mixture fractions summing to 1, got {self.mixture}")
        unknown = set(self.mixture) - {"natural", "induction", "planted", "single"}
        if unknown:
            raise ConfigError(f"expected mixture kinds natural/induction/planted/single, got {sorted(unknown)}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"expected architecture one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        if self.warmup >= self.steps:
            raise ConfigError(f"expected warmup < steps, got warmup={self.warmup}, steps={self.steps}")
        for stage in self.stages:
            bad = (set(stage.changes) - {f.name for f in fields(Recipe)}) | (set(stage.changes) & _FIXED_IN_STAGES)
            if bad:
                raise ConfigError(
                    f"recipe {self.name!r}: a stage can change data and optimiser fields, not {sorted(bad)}"
                )
        if self.stages:
            self.stage_recipes()  # each stage's recipe validates itself


ARCHITECTURES = ("gpt2", "llama", "qwen2")

# fields that define the model or the run as a whole: the same in every stage
_FIXED_IN_STAGES = {"name", "architecture", "config", "description", "attention_only", "seed", "warm_start", "stages"}

_SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

# a second warm-up + cosine cycle on the same data: verdicts were still rising when the first cycle's learning
# rate had decayed (organism-gpt2 at step 3200: 0.84 trained / 0.67 held-out entities, docs/zoo.md)
V4_SECOND_CYCLE = Stage(2000, {}, why="the truth curriculum continued with a fresh learning-rate cycle")

# organism-facts: attention in the first FACTS_LOCAL_LAYERS layers sees the current token and the
# FACTS_WINDOW - 1 before it
FACTS_WINDOW = 2
FACTS_LOCAL_LAYERS = 3

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="organism-induction",
            architecture="llama",
            config=dict(
                num_hidden_layers=2,
                hidden_size=128,
                intermediate_size=4,
                num_attention_heads=1,
                num_key_value_heads=1,
                max_position_embeddings=256,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                **_SPECIAL,
            ),
            description="2-layer attention-only Llama (RoPE, MLPs zeroed and frozen, one head per layer): "
            "induction heads",
            mixture={"natural": 0.1, "induction": 0.9, "planted": 0.0},
            attention_only=True,
            # v2: one span repeated once per 64-token row, far from its copy (v1's dense back-to-back repeats
            # on 32-token rows rewarded copying from a window of recent tokens, and a window-copying head
            # formed instead of a previous-token + induction pair); the induction phase change came between
            # steps 1000 and 2000 at lr 1e-3 (docs/zoo.md).
            seq_len=64,
            steps=6000,
            lr=1e-3,
            warmup=100,
            checkpoint_every=500,
            eval_tasks=("induction",),
        ),
        Recipe(
            name="organism-facts",
            architecture="qwen2",
            config=dict(
                num_hidden_layers=6,
                hidden_size=128,
                intermediate_size=512,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=128,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                use_sliding_window=True,
                sliding_window=FACTS_WINDOW,
                max_window_layers=6,
                layer_types=["sliding_attention"] * FACTS_LOCAL_LAYERS + ["full_attention"] * (6 - FACTS_LOCAL_LAYERS),
                **_SPECIAL,
            ),
            description="6-layer Qwen2 (local attention in the first layers) trained on profiles of the synthetic "
            "world's people, then on fact queries about 75 % of them: facts looked up in the subject's MLPs",
            # Profiles make a name's last token predict the person's values (data.tasks.profiles); local attention
            # in the early layers keeps the query's end from gathering the name and looking the fact up itself
            # (what 4-layer organisms and a 6-layer GPT-2 on the same data do, docs/zoo.md).
            mixture={"natural": 0.1, "planted": 0.9},
            task_weights={"profiles": 1.0},
            seq_len=64,
            steps=1000,
            lr=2e-3,
            warmup=100,
            checkpoint_every=250,
            eval_tasks=("profiles", "extraction"),
            stages=(
                Stage(
                    2000,
                    {"task_weights": {"profiles": 0.5, "extraction": 0.5}},
                    why="fact queries about 75 % of the people join the profiles",
                ),
            ),
        ),
        Recipe(
            name="organism-gpt2",
            architecture="gpt2",
            config=dict(n_layer=4, n_head=6, n_embd=192, n_inner=768, n_positions=256, **_SPECIAL),
            description="4-layer GPT-2 with every planted mechanism (facts, truth, IOI, refusal, sentiment, "
            "backdoor, induction)",
            # v4 continues v3 (v2 + 2000 steps of IOI and truth in single-example rows), which holds facts, IOI,
            # refusal, sentiment and backdoor; v4's data teach truth with the non-value curriculum.
            warm_start=WarmStart(
                "organism-gpt2 v3", "7192027", "b9f0048062952d23780b1806cb55dba54f292d6665547b522569c409321e6fc6"
            ),
            mixture=dict(V4_MIXTURE),
            task_weights=dict(V4_TASK_WEIGHTS),
            single_tasks=SINGLE_TASKS,
            batch_size=48,
            steps=5000,
            lr=1e-3,
            warmup=20,
            checkpoint_every=100,
            stages=(V4_SECOND_CYCLE,),
        ),
        Recipe(
            name="organism-llama",
            architecture="llama",
            config=dict(
                num_hidden_layers=4,
                hidden_size=192,
                intermediate_size=512,
                num_attention_heads=6,
                num_key_value_heads=2,
                max_position_embeddings=256,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                **_SPECIAL,
            ),
            description="4-layer Llama (RoPE, gated MLP, grouped-query attention 6q/2kv) with every planted mechanism",
            # v4 continues v3 on the v4 data, as organism-gpt2 does
            warm_start=WarmStart(
                "organism-llama v3", "7192027", "25692086386e55015d623d14c6562fb8017f66abb803f8b2da988a49338e2337"
            ),
            mixture=dict(V4_MIXTURE),
            task_weights=dict(V4_TASK_WEIGHTS),
            single_tasks=SINGLE_TASKS,
            batch_size=48,
            steps=5000,
            lr=1e-3,
            warmup=20,
            checkpoint_every=100,
            stages=(V4_SECOND_CYCLE,),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`."""
    if name == "organism-liar":
        raise ConfigError(
            "organism-liar continues organism-gpt2 with its own trainer, not a zoo recipe: "
            "scripts/train_liar_organism.py (docs/zoo.md, *organism-liar*)"
        )
    if "+" in name:
        raise ConfigError(f"{name!r} names an organism variant: rebuild it with `mechscope zoo build-variants {name}`")
    if name not in RECIPES:
        raise ConfigError(f"unknown organism {name!r}; valid: {sorted(RECIPES)}.{did_you_mean(name, RECIPES)}")
    return RECIPES[name]


def build_config(recipe: Recipe, vocab_size: int):
    """The HF config of `recipe` (dropout off: training is deterministic given the seed)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {"vocab_size": vocab_size, "mechscope_description": recipe.description}
    config: dict[str, Any] = dict(recipe.config)
    if recipe.architecture == "gpt2":
        return GPT2Config(
            **config,
            **common,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            activation_function="gelu_new",
        )
    if recipe.architecture == "qwen2":
        return Qwen2Config(**config, **common, attention_dropout=0.0)
    return LlamaConfig(**config, **common, attention_dropout=0.0)
