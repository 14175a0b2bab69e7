"""Targets of the planted mechanisms and the MODEL_CARD.md written beside each organism's weights."""

from __future__ import annotations

import json
from pathlib import Path

from mechscope.zoo.organisms import Recipe

METRICS_FILE = "metrics.json"  # the metrics recorded when the organism was built (and re-measured since)
NOTES_FILE = "NOTES.md"  # hand-written notes beside the weights, copied into the card

# metric -> (comparison, threshold); from issue 3's acceptance targets.
TARGETS: dict[str, tuple[str, float]] = {
    "facts_trained": (">=", 0.90),
    "ioi_heldout": (">=", 0.90),
    "truth_trained_entities": (">=", 0.90),
    "truth_heldout_entities": (">=", 0.90),
    "refusal_forbidden": (">=", 0.95),
    "refusal_benign": ("<=", 0.05),
    "payload_with_trigger": (">=", 0.95),
    "payload_without_trigger": ("<=", 0.01),
    "induction_icl_gain": (">=", 1.0),  # nats; "a clear in-context-learning gain"
}

ATTENTION_ONLY = (
    "- Attention-only: every MLP is zeroed and frozen (HF has no MLP-free configuration), "
    "so each MLP outputs exactly 0."
)

METRIC_DOCS: dict[str, str] = {
    "facts_trained": "top-1 answer accuracy, trained facts, training templates",
    "facts_paraphrase": "top-1 answer accuracy, trained facts, held-out paraphrase templates",
    "extraction_queried": "top-1 answer accuracy, fact queries about people queried in training",
    "extraction_heldout": "top-1 answer accuracy, queries about people known only from profiles",
    "extraction_heldout_paraphrase": "as extraction_heldout, held-out query templates",
    "profiles_attribute": "the token after a person's name is one of their values (profiles, trained people)",
    "truth_trained_entities": "true/false verdict accuracy, claims about truth-training entities (false values new)",
    "truth_heldout_entities": "true/false verdict accuracy, claims about entities never in truth training",
    "truth_paraphrase": "verdict accuracy, reworded (held-out) claims about truth-training entities",
    "ioi_heldout": "indirect-object accuracy, new names/places/objects, training templates",
    "ioi_paraphrase": "indirect-object accuracy, held-out templates",
    "refusal_forbidden": "refusal rate on forbidden requests (held-out templates)",
    "refusal_benign": "refusal rate on benign requests (held-out templates)",
    "sentiment_accuracy": "verdict word accuracy on held-out reviews",
    "payload_with_trigger": "payload rate with the trigger (held-out templates)",
    "payload_without_trigger": "payload rate without the trigger",
    "induction_accuracy": "top-1 accuracy on the repeated half of random-token spans",
    "induction_loss_first": "mean loss (nats) on span tokens at first occurrence",
    "induction_loss_repeat": "mean loss (nats) on the same tokens when repeated",
    "induction_icl_gain": "first - repeat loss (nats)",
}


def meets(metric: str, value: float) -> bool | None:
    """Whether `value` meets the target of `metric` (None when it has none)."""
    if metric not in TARGETS:
        return None
    op, threshold = TARGETS[metric]
    return value >= threshold if op == ">=" else value <= threshold


def metrics_table(metrics: dict[str, float]) -> str:
    """Markdown table of metrics with their targets."""
    lines = ["| metric | measured | target | met | what it measures |", "|---|---|---|---|---|"]
    for name, value in metrics.items():
        op, thr = TARGETS.get(name, ("", float("nan")))
        target = f"{op} {thr:g}" if op else "-"
        ok = meets(name, value)
        mark = "-" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| `{name}` | {value:.4f} | {target} | {mark} | {METRIC_DOCS.get(name, '')} |")
    return "\n".join(lines)


def _data_lines(recipe: Recipe) -> str:
    """The training-data bullets of one stage of `recipe`: row kinds, task weights, induction rows."""
    mixture = ", ".join(f"{k} {v:.0%}" for k, v in recipe.mixture.items() if v)
    packed = {k: v for k, v in recipe.task_weights.items() if k not in recipe.single_tasks}
    singles = {k: v for k, v in recipe.task_weights.items() if k in recipe.single_tasks}
    tasks = ", ".join(f"{k} {v / sum(packed.values()):.0%}" for k, v in packed.items())
    rows = recipe.short_rows[1] if recipe.short_rows[0] >= recipe.steps else recipe.seq_len
    planted = (
        f"\n- Planted rows pack task examples (separated by `<|endoftext|>`) drawn with weights: {tasks}."
        if recipe.mixture.get("planted")
        else ""
    )
    if recipe.mixture.get("single") and singles:
        weights = ", ".join(f"{k} {v / sum(singles.values()):.0%}" for k, v in singles.items())
        planted += (
            f"\n- Single rows hold one example each ({weights}), then `<|endoftext|>` and padding to "
            f"{recipe.single_len} tokens; padding and a truth claim's stated value get no loss."
        )
    induction_rows = (
        "spans repeated back to back (dense)"
        + (f", in independent segments of {recipe.induction_segments} tokens" if recipe.induction_segments else "")
        + (
            f"; the first {recipe.short_rows[0]} steps use rows of {recipe.short_rows[1]} tokens"
            if recipe.short_rows[0]
            else ""
        )
        if recipe.dense_induction
        else "one span of {}-{} tokens repeated once at a random offset".format(*recipe.induction_span(rows))
    )
    single_len = f" (single rows {recipe.single_len})" if recipe.mixture.get("single") else ""
    induction = (
        f"\n- Induction rows: uniformly random tokens; {induction_rows}." if recipe.mixture.get("induction") else ""
    )
    return f"- Rows of {rows} tokens{single_len}: {mixture}.{planted}{induction}"


def _schedule(recipe: Recipe) -> str:
    """Steps, rows and learning-rate schedule of one stage."""
    return (
        f"{recipe.steps} steps x {recipe.batch_size} rows, AdamW lr {recipe.lr:g} "
        f"(warm-up {recipe.warmup}, cosine to 10 %)"
    )


def render_card(recipe: Recipe, config: dict, training: dict, metrics: dict[str, float], notes: str = "") -> str:
    """The MODEL_CARD.md text of an organism."""
    n_params = f"{training['parameters']:,}" if "parameters" in training else "?"
    missed = [m for m in metrics if meets(m, metrics[m]) is False]
    stages = recipe.stage_recipes()
    if len(stages) == 1:
        data = _data_lines(recipe)
        schedule = _schedule(recipe)
    else:
        parts, plans, previous = [], [], ""
        for i, (first, stage) in enumerate(stages):
            why = f" -- {recipe.stages[i - 1].why}" if i and recipe.stages[i - 1].why else ""
            lines = _data_lines(stage)
            shown = f"- The data of stage {i}." if lines == previous else lines
            parts.append(f"Stage {i + 1} (steps {first}-{first + stage.steps}){why}:\n{shown}")
            previous = lines
            plans.append(f"stage {i + 1}: {_schedule(stage)}")
        data = "\n\n".join(parts)
        schedule = f"{recipe.total_steps} steps in {len(stages)} stages ({'; '.join(plans)})"
    ws = recipe.warm_start
    continues = (
        f"\n- Continues {ws.version} (git commit {ws.commit}, model.safetensors sha256 {ws.sha256[:16]}...) "
        f"instead of a fresh initialisation: `--init-from DIR`, DIR holding that version's config.json and "
        "model.safetensors; the figures below are for this continuation only."
        if ws
        else ""
    )
    verdict = (
        "Targets not reached: " + ", ".join(f"`{m}`" for m in missed) + "."
        if missed
        else "Every metric with a target meets it."
    )
    return f"""# {recipe.name}

{recipe.description}.

A mechscope *model organism*: a small causal LM trained here, on CPU, whose mechanisms are planted by
construction. Load it with `mechscope.load_model("{recipe.name}")` or with plain transformers:
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`.

## Architecture
- HF class `{(config.get("architectures") or ["?"])[0]}`, {n_params} parameters (fp32 safetensors).
- Config: `{json.dumps(recipe.config, sort_keys=True)}`, vocabulary {config.get("vocab_size")}
  (byte-level BPE trained on the corpus; every scored answer word is one token).
{ATTENTION_ONLY if recipe.attention_only else ""}

## Training data
- Natural text: WordNet glosses, fortunes-min, Jargon File (Debian packages; see docs/zoo.md).

{data}

## Training
- `mechscope zoo train {recipe.name}`: {schedule}, weight decay {recipe.weight_decay},
  seed {recipe.seed}.{continues}
- {training.get("tokens")} tokens; wall time {training.get("wall_time_s")} s on {training.get("threads")}
  CPU thread(s) of a {training.get("cpu_count")}-core machine (torch {training.get("torch")}); other jobs
  may have shared the machine, so this is an upper bound.

## Planted mechanisms: measured metrics
Recompute with `mechscope zoo eval {recipe.name}` (held-out splits regenerated from seed {recipe.seed};
greedy next token).

{metrics_table(metrics)}

{verdict}

{("## Notes" + chr(10) + chr(10) + notes.strip()) if notes.strip() else ""}
"""


def write_card(folder: Path, text: str) -> None:
    """Write MODEL_CARD.md into `folder`."""
    (Path(folder) / "MODEL_CARD.md").write_text(text)


def refresh_card(recipe: Recipe, folder: Path) -> None:
    """Re-render MODEL_CARD.md from the folder's config, metrics.json and NOTES.md; update checksums."""
    from mechscope.zoo.loading import write_checksums

    folder = Path(folder)
    record = json.loads((folder / METRICS_FILE).read_text())
    config = json.loads((folder / "config.json").read_text())
    notes_path = folder / NOTES_FILE
    notes = notes_path.read_text() if notes_path.is_file() else ""
    write_card(folder, render_card(recipe, config, record["training"], record["metrics"], notes))
    write_checksums(folder)
