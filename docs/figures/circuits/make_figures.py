"""Regenerate the numbers and figures of docs/locate-circuits.md (CPU, about a minute).

    OMP_NUM_THREADS=1 nice -n 10 python docs/figures/circuits/make_figures.py

Writes small HTML figures here (plotly.js loaded from its CDN to keep the repository small; the
library's own ``write_circuit_html`` embeds plotly.js instead) and prints the tables in the doc.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import mechscope
from mechscope.locate.circuits import acdc, circuit_figure, eap, eap_ig, faithfulness, faithfulness_curve
from mechscope.locate.circuits.faithfulness import CircuitEvaluator
from mechscope.locate.metrics import logit_diff
from mechscope.data.tasks import vocab
from mechscope.data.tasks.induction import sequences

HERE = Path(__file__).resolve().parent


def save(fig, name: str) -> None:
    fig.write_html(str(HERE / name), include_plotlyjs="cdn", full_html=True)


def exact_effects(model, clean, corrupt, metric):
    ev = CircuitEvaluator(model, clean, corrupt, metric)
    out = []
    for edge in range(ev.graph.n_edges):
        mask = torch.ones(ev.graph.n_edges, dtype=torch.bool)
        mask[edge] = False
        out.append(ev.metric(mask) - ev.full_metric)
    return torch.tensor(out)


def compare(name, model, clean, corrupt, metric, top: int = 8):
    import plotly.graph_objects as go

    plain = eap(model, clean, corrupt, metric)
    ig = eap_ig(model, clean, corrupt, metric, steps=5)
    names = plain.edge_names
    n = len(names)
    exact = exact_effects(model, clean, corrupt, metric) if n <= 1000 else None
    print(f"\n### {name}: {n} edges, full-model metric {float(plain['metric']):.3f}")
    if exact is not None:
        c_eap = torch.corrcoef(torch.stack([exact, plain["scores"]]))[0, 1]
        c_ig = torch.corrcoef(torch.stack([exact, ig["scores"]]))[0, 1]
        print(f"Pearson r with exact single-edge ablation: EAP {c_eap:.3f}, EAP-IG {c_ig:.3f}\n")
        print("| edge | exact | EAP | EAP-IG |\n|---|---|---|---|")
        for i in exact.abs().argsort(descending=True)[:top].tolist():
            print(f"| `{names[i]}` | {exact[i]:+.3f} | {plain['scores'][i]:+.3f} | {ig['scores'][i]:+.3f} |")
        fig = go.Figure()
        for label, s in (("EAP", plain["scores"]), ("EAP-IG", ig["scores"])):
            fig.add_trace(go.Scatter(x=exact.tolist(), y=s.tolist(), mode="markers", name=label, text=names))
        fig.update_layout(
            title=f"{name}: estimated vs exact edge ablation effect", xaxis_title="exact", yaxis_title="estimate"
        )
        save(fig, f"{name}-eap-vs-exact.html")
    curves = {}
    for label, scores in (("EAP", plain), ("EAP-IG", ig)):
        curves[label] = faithfulness_curve(model, scores, clean, corrupt, metric)
    fig = go.Figure()
    for label, curve in curves.items():
        fig.add_trace(
            go.Scatter(x=curve["n_edges"].tolist(), y=curve["faithfulness"].tolist(), name=label, mode="lines+markers")
        )
    fig.update_layout(
        title=f"{name}: faithfulness vs circuit size", xaxis_title="edges kept", yaxis_title="faithfulness"
    )
    fig.update_xaxes(type="log")
    save(fig, f"{name}-faithfulness-curve.html")
    print("\n| edges kept | " + " | ".join(str(k) for k in curves["EAP"]["n_edges"].tolist()) + " |")
    print("|---" * (1 + len(curves["EAP"]["n_edges"])) + "|")
    for label, curve in curves.items():
        print(f"| {label} faithfulness | " + " | ".join(f"{v:.2f}" for v in curve["faithfulness"].tolist()) + " |")
    return plain, ig


def induction() -> None:
    model = mechscope.load_model("organism-induction")
    batch = sequences(0, "circuits", 16, seq_len=32, token_range=(1, 4096), span=(4, 8), dense=True)
    clean = batch.tokens
    corrupt = torch.randint(1, 4096, clean.shape, generator=torch.Generator().manual_seed(5))
    targets, weights = clean[:, 1:], batch.repeat_mask[:, 1:].float()

    def metric(logits):
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return (logp * weights).sum(1) / weights.sum(1)

    with torch.no_grad():
        print(
            f"organism-induction: mean log p(repeated token) clean {float(metric(model.forward(clean)).mean()):.3f}, "
            f"corrupted {float(metric(model.forward(corrupt)).mean()):.3f}"
        )
    compare("induction", model, clean, corrupt, metric)
    for tau in (0.02, 0.05, 0.2):
        circuit = acdc(model, clean, corrupt, metric, threshold=tau)
        f = faithfulness(model, circuit, clean, corrupt, metric).value
        print(f"\nACDC tau={tau}: {circuit.n_edges} edges, faithfulness {f:.3f}: {', '.join(circuit.edges)}")
        if tau == 0.05:
            save(circuit_figure(circuit, title=f"organism-induction, ACDC tau={tau}"), "induction-acdc.html")
    kl = acdc(model, clean, corrupt, threshold=0.05)
    print(f"\nACDC (KL damage) tau=0.05: {kl.n_edges} edges, KL {kl.config['damage']:.3f}: {', '.join(kl.edges)}")


def ioi() -> None:
    model = mechscope.load_model("organism-gpt2")
    rng = random.Random(0)
    template = "When {a} and {b} went to the {place}, {s} gave a {obj} to"
    clean, corrupt, io, subj = [], [], [], []
    while len(clean) < 24:
        a, b, c = rng.sample(vocab.IOI_NAMES, 3)
        place, obj = rng.choice(vocab.IOI_PLACES), rng.choice(vocab.IOI_OBJECTS)
        x, y = (template.format(a=a, b=b, s=s, place=place, obj=obj) for s in (b, c))
        lx, ly = (len(model.to_tokens(t)["input_ids"][0]) for t in (x, y))
        if lx != ly or (clean and lx != len(model.to_tokens(clean[0])["input_ids"][0])):
            continue
        clean.append(x)
        corrupt.append(y)
        io.append(model.to_single_token(" " + a))
        subj.append(model.to_single_token(" " + b))

    def metric(logits):
        return logit_diff(logits, io, subj)

    with torch.no_grad():
        d = metric(model.forward(clean))
        print(
            f"\norganism-gpt2 IOI: clean logit diff IO - S {float(d.mean()):.3f} "
            f"(IO > S on {float((d > 0).float().mean()):.2f}), "
            f"corrupted {float(metric(model.forward(corrupt)).mean()):.3f}"
        )
    _, ig = compare("ioi", model, clean, corrupt, metric)
    print(
        "\nEAP-IG top edges: "
        + ", ".join(f"`{ig.edge_names[i]}` {float(ig['scores'][i]):+.3f}" for i in ig.ranking()[:10].tolist())
    )
    save(circuit_figure(ig.top(30), title="organism-gpt2 IOI: top 30 EAP-IG edges"), "ioi-eap-ig-top30.html")
    agreement(model, clean, corrupt, metric, ig)


def agreement(model, clean, corrupt, metric, ig, k: int = 3) -> None:
    """Heads that activation patching, path patching (to the logits) and EAP-IG each put first."""
    from mechscope.locate.path_patching import path_patch
    from mechscope.locate.patching import activation_patch

    n_heads = model.dims.n_heads

    def top(effect: torch.Tensor) -> list[str]:
        order = effect.flatten().abs().argsort(descending=True)[:k].tolist()
        return [f"a{i // n_heads}.h{i % n_heads}" for i in order]

    with torch.no_grad():
        clean_value = float(metric(model.forward(clean)).mean())
    patched = activation_patch(model, clean, corrupt, "heads", metric, direction="noising")["metric"] - clean_value
    paths = path_patch(model, clean, corrupt, metric).effect()
    into_logits = [ig.edge_names[i] for i in ig.ranking()[:20].tolist() if ig.edge_names[i].endswith("->logits")]
    heads_ig = [e.split("->")[0] for e in into_logits if e.startswith("a")]
    print(f"\nactivation patching (noising), top {k} heads by |effect|: {top(patched)}")
    print(f"path patching head -> logits, top {k} heads: {top(paths)}")
    print(f"EAP-IG top-20 edges into the logits from heads: {heads_ig}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    induction()
    ioi()
