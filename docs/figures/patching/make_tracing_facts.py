"""Causal tracing on organism-facts: where are facts looked up? Prints the tables of docs/locate-patching.md.

Traces 40 correctly answered queries about people known only from profiles and 40 about people queried
in training (5 noise draws each), and writes ``tracing-facts-{kind}.html`` for the first set.
Run: ``.venv/bin/python docs/figures/patching/make_tracing_facts.py`` (about a minute on one thread).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import mechscope
from mechscope.locate.causal_tracing import TracingConfig, trace_facts
from mechscope.data.tasks import generate_all
from mechscope.data.tasks.profiles import people

HERE = Path(__file__).resolve().parent
WORLD = people(0)
DATA = generate_all(0, ("extraction",))["extraction"]


def recalled(model, split: str, n: int = 40) -> list[tuple[str, str, int]]:
    """(prompt, subject, answer id) of the first `n` queries of `split` the model answers correctly."""
    out = []
    for example in DATA.eval[split]:
        target = model.to_single_token(example.target)
        if int(model(model.to_tokens(example.prompt)["input_ids"])[0, -1].argmax()) == target:
            out.append((example.prompt, next(e for e in WORLD.entities if e in example.prompt), target))
        if len(out) == n:
            break
    return out


def main() -> None:
    torch.set_num_threads(1)
    model = mechscope.load_model(sys.argv[1] if len(sys.argv) > 1 else "organism-facts")
    for split in ("heldout", "queried"):
        facts = recalled(model, split)
        start = time.perf_counter()
        summary = trace_facts(
            model, [f[0] for f in facts], [f[1] for f in facts], [f[2] for f in facts], TracingConfig(samples=5)
        )
        print(f"== {split}: {len(facts)} facts, samples 5, {time.perf_counter() - start:.1f}s")
        print(f"  mean p(answer) clean - corrupted: {summary.config['mean_clean_minus_corrupt']:.3f}")
        print(f"  columns: {summary.labels['position_class']}")
        for kind in ("resid", "mlp", "attn"):
            print(f"  {kind} peak (layer, class, mean effect): {summary.peak(kind)}")
            print("  " + str(summary[kind].numpy().round(3)).replace("\n", "\n  "))
            if split == "heldout":
                fig = summary.plot(kind, title=f"organism-facts: causal tracing, {kind} (profile-only people)")
                fig.write_html(str(HERE / f"tracing-facts-{kind}.html"), include_plotlyjs="cdn", full_html=True)


if __name__ == "__main__":
    main()
