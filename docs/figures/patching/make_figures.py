"""Measure patching, path patching, causal tracing and AtP on the bundled organisms; write figures.

Prints every number quoted in docs/locate-patching.md and writes the HTML figures next to this file.

    OMP_NUM_THREADS=1 python docs/figures/patching/make_figures.py
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import plotly.graph_objects as go
import torch

import mechscope
from mechscope.locate.attribution_patching import AtPConfig, atp_vs_exact, attribution_patch
from mechscope.locate.causal_tracing import TracingConfig, trace_facts
from mechscope.locate.metrics import logit_diff
from mechscope.locate.patching import activation_patch
from mechscope.locate.path_patching import path_patch
from mechscope.data.tasks import vocab
from mechscope.data.tasks.facts import generate
from mechscope.data.tasks.world import make_world

HERE = Path(__file__).resolve().parent
WORLD, FACTS = make_world(0), generate(0)


def save(fig: go.Figure, name: str) -> None:
    fig.write_html(str(HERE / name), include_plotlyjs="cdn", full_html=True)


def entity(prompt: str) -> str:
    return next(e for e in WORLD.entities if e in prompt)


def traced_facts(model, n: int = 40) -> list[tuple[str, str, int]]:
    out = []
    for e in FACTS.eval["trained"][:200]:
        target = model.to_single_token(e.target)
        if int(model(model.to_tokens(e.prompt)["input_ids"])[0, -1].argmax()) == target:
            out.append((e.prompt, entity(e.prompt), target))
        if len(out) == n:
            break
    return out


def colour_pairs(model, n: int = 8):
    examples = [e for e in FACTS.eval["trained"] if e.prompt.startswith("The favourite colour of")][:40]
    by_len: dict[int, list] = {}
    for e in examples:
        by_len.setdefault(model.to_tokens(e.prompt)["input_ids"].shape[1], []).append(e)
    group = max(by_len.values(), key=len)
    pairs = []
    for e, f in zip(group, group[1:] + group[:1]):
        if WORLD.facts[entity(e.prompt)]["favourite_colour"] != WORLD.facts[entity(f.prompt)]["favourite_colour"]:
            pairs.append((e.prompt, f.prompt, model.to_single_token(e.target), model.to_single_token(f.target)))
    return pairs[:n]


def ioi_pairs(model, n: int = 16):
    rng = random.Random(0)
    template = "When {a} and {b} went to the {place}, {s} gave a {obj} to"
    names = [
        x for x in vocab.IOI_NAMES if model.to_tokens(" " + x, add_special_tokens=False)["input_ids"].shape[1] == 1
    ]
    clean, corrupt, io, s, length = [], [], [], [], None
    while len(clean) < n:
        a, b, c = rng.sample(names, 3)
        place, obj = rng.choice(vocab.IOI_PLACES), rng.choice(vocab.IOI_OBJECTS)
        p = template.format(a=a, b=b, s=b, place=place, obj=obj)
        q = template.format(a=a, b=b, s=c, place=place, obj=obj)  # ABC: the second S replaced
        size = model.to_tokens(p)["input_ids"].shape[1]
        length = length or size
        if size != length or model.to_tokens(q)["input_ids"].shape[1] != length:
            continue
        clean.append(p)
        corrupt.append(q)
        io.append(model.to_single_token(" " + a))
        s.append(model.to_single_token(" " + b))
    return clean, corrupt, io, s


def main() -> None:
    torch.set_num_threads(1)
    for name in ("organism-gpt2", "organism-llama"):
        model = mechscope.load_model(name)
        short = name.removeprefix("organism-")
        print(f"== {name}")
        # Causal tracing over 40 correctly recalled facts.
        facts = traced_facts(model)
        start = time.perf_counter()
        summary = trace_facts(
            model, [f[0] for f in facts], [f[1] for f in facts], [f[2] for f in facts], TracingConfig(samples=5)
        )
        print(f"causal tracing: {len(facts)} facts, samples 5, {time.perf_counter() - start:.1f}s")
        print(f"  mean p(answer) clean - corrupted: {summary.config['mean_clean_minus_corrupt']:.3f}")
        for kind in ("resid", "mlp", "attn"):
            print(f"  {kind} peak (layer, class, mean effect): {summary.peak(kind)}")
            print("  " + str(summary[kind].numpy().round(3)).replace("\n", "\n  "))
            save(summary.plot(kind, title=f"{name}: causal tracing, {kind}"), f"tracing-{short}-{kind}.html")
        # AtP vs exact on fact pairs (clean entity vs another entity with another colour).
        pairs = colour_pairs(model)
        clean, corrupt = [p[0] for p in pairs], [p[1] for p in pairs]
        good, bad = [p[2] for p in pairs], [p[3] for p in pairs]

        def fact_metric(logits: torch.Tensor, good: list[int] = good, bad: list[int] = bad) -> torch.Tensor:
            return logit_diff(logits, good, bad)

        for node, units in (("heads", None), ("resid", None), ("neurons", range(0, model.dims.d_mlp, 8))):
            report = atp_vs_exact(model, clean, corrupt, fact_metric, node=node, units=units)
            c = report.config
            print(
                f"AtP vs exact, {node} ({len(pairs)} fact pairs): "
                f"spearman {c['spearman']:.3f} pearson {c['pearson']:.3f}"
            )
            print(f"  top disagreements: {c['top_disagreements'][:3]}")
            if node == "heads":
                fig = go.Figure(
                    go.Scatter(
                        x=report["exact"].flatten().tolist(),
                        y=report["atp"].flatten().tolist(),
                        mode="markers",
                        text=[
                            f"L{layer} H{h}" for layer in range(model.dims.n_layers) for h in range(model.dims.n_heads)
                        ],
                    )
                )
                fig.update_layout(
                    title=f"{name}: AtP vs exact head patching (facts)", xaxis_title="exact", yaxis_title="AtP"
                )
                save(fig, f"atp-vs-exact-{short}.html")
        star = attribution_patch(
            model, clean, corrupt, fact_metric, AtPConfig(nodes=("heads",), qk_fix=True, grad_drop=True)
        )
        print(f"  AtP* q {star['q'].numpy().round(3).tolist()}")
        print(f"  AtP* k {star['k'].numpy().round(3).tolist()}")
        exact_q = activation_patch(model, clean, corrupt, "q", fact_metric)
        exact_k = activation_patch(model, clean, corrupt, "k", fact_metric)
        for label, est, ex in (("q", star["q"], exact_q), ("k", star["k"], exact_k)):
            delta = (ex["metric"] - ex["corrupt"]).flatten()
            corr = torch.corrcoef(torch.stack([est.flatten(), delta]))[0, 1]
            print(f"  AtP* QK-fix {label} vs exact {label} patching: pearson {float(corr):.3f}")
        # IOI: activation patching and path patching (ABC corruption).
        clean, corrupt, io, s = ioi_pairs(model)

        def ioi_metric(logits: torch.Tensor, io: list[int] = io, s: list[int] = s) -> torch.Tensor:
            return logit_diff(logits, io, s)

        heads = activation_patch(model, clean, corrupt, "heads", ioi_metric)
        print(
            f"IOI ({len(clean)} ABC pairs): logit diff "
            f"clean {float(heads['clean']):.3f} corrupt {float(heads['corrupt']):.3f}"
        )
        print(
            "  heads, denoising metric change:\n  "
            + str((heads["metric"] - heads["corrupt"]).numpy().round(3)).replace("\n", "\n  ")
        )
        paths = path_patch(model, clean, corrupt, ioi_metric)
        print(
            "  path patching to logits, metric change:\n  " + str(paths.effect().numpy().round(3)).replace("\n", "\n  ")
        )
        save(heads.plot(title=f"{name}: IOI head patching (denoising)"), f"ioi-heads-{short}.html")


if __name__ == "__main__":
    main()
