"""EAP on a real post-norm model: Gemma-3-270M, three name-mover prompts in one left-padded batch.

Prints the graph's size, EAP's time, the strongest edges' EAP scores beside their exact single-edge
ablations, the correlation of the two over those and as many random edges, and the faithfulness of the
top 200 edges (figures in docs/locate-circuits.md). Needs the real models: scripts/install_real_models.sh.

    .venv/bin/python scripts/measure_gemma_circuits.py [--top 15]
"""

from __future__ import annotations

import argparse
import time

import torch

import mechscope as ms
from mechscope.locate import eap, faithfulness
from mechscope.locate.circuits import Graph
from mechscope.locate.circuits.faithfulness import CircuitEvaluator
from mechscope.locate.metrics import logit_diff_metric

CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Anna went to the park, Anna gave a ball to",
    "After Lucy and Mark met, Mark thanked",
]
CORRUPT = [
    "When Mary and John went to the store, Kate gave a drink to",
    "When Tom and Anna went to the park, Paul gave a ball to",
    "After Lucy and Mark met, Sara thanked",
]
ANSWERS, WRONG = [" Mary", " Tom", " Lucy"], [" John", " Anna", " Mark"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, help="strongest edges (and as many random ones) checked")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = ms.load_model("gemma3-270m")
    print(f"loaded in {time.perf_counter() - start:.1f} s: {model.dims.family}, {model.dims.n_layers} layers")
    graph = Graph.from_model(model)
    first = lambda words: [model.tokenizer.encode(w, add_special_tokens=False)[0] for w in words]  # noqa: E731
    metric = logit_diff_metric(first(ANSWERS), first(WRONG))
    lengths = model.to_tokens(CLEAN, padding_side="left")["attention_mask"].sum(1).tolist()
    print(f"{graph.n_edges} edges; real tokens per row {lengths}")

    start = time.perf_counter()
    scores = eap(model, CLEAN, CORRUPT, metric)
    print(f"EAP: {time.perf_counter() - start:.1f} s")
    evaluator = CircuitEvaluator(model, CLEAN, CORRUPT, metric, ablation="resample")
    print(f"clean metric {float(evaluator.full_metric):.2f}")
    values = scores["scores"]
    strongest = values.abs().argsort(descending=True)[: args.top].tolist()
    random = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))[: args.top].tolist()
    exact = []
    for edge in strongest + random:
        mask = torch.ones(graph.n_edges, dtype=torch.bool)
        mask[edge] = False
        exact.append(float(evaluator.metric(mask) - evaluator.full_metric))
    for edge, effect in zip(strongest[:8], exact):
        print(f"  {graph.edge_names[edge]:<22} EAP {float(values[edge]):+.3f}   exact {effect:+.3f}")
    both = torch.stack([values[strongest + random], torch.tensor(exact)])
    print(f"r(EAP, exact) over {len(exact)} edges: {float(torch.corrcoef(both)[0, 1]):.3f}")
    kept = faithfulness(model, scores.top(200), CLEAN, CORRUPT, metric).value
    print(f"faithfulness of the top 200 edges: {kept:.2f}")


if __name__ == "__main__":
    main()
