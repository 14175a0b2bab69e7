"""Figures of Gemma-3-270M (a real post-norm model whose tokenizer puts a BOS before text), by section:

- ``bos``: loss on repeated random tokens and on packed English rows with and without the BOS;
- ``eap``: EAP on three name-mover prompts in one left-padded batch: the strongest edges' scores beside
  their exact single-edge ablations, their correlation over those and as many random edges, and the
  faithfulness of the top 200 edges (docs/locate-circuits.md);
- ``rome``: one ROME edit at the default layer with its metrics before and after (docs/real-models.md);
- ``means``: the BOS residual's norm against a text token's, and how far a mean-read steering vector moves
  when the BOS is counted in each prompt's mean (mechscope leaves it out), and how much of the refusal-direction
  search's retain subspace changes when its PCA counts the BOS; and what mean-ablating a layer's attention
  output over tokens does to the name-mover prompts' logit difference when each row's BOS is left out of the
  mean and as it is (mechscope) against counting it and overwriting it;
- ``lens``: the logit lens's per-layer KL on held-out text over text tokens, with the BOS counted, and at the
  BOS alone; then a tuned lens trained briefly on other text, against the logit lens on the held-out text;
- ``sae``: a TopK SAE trained on the layer-6 residual of the default English stream (standard-library
  docstrings), scored on its held-out split: explained variance, L0, dead features and the next-token
  loss with it spliced in.

The model in half precision: scripts/measure_dtypes.py.

Needs the real models: scripts/install_real_models.sh.

    .venv/bin/python scripts/measure_gemma.py [--only bos eap rome means lens sae] [--top 15]
        [--lens-steps 60] [--sae-steps 3000]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import pathlib
import time
import typing
from pathlib import Path
from typing import Any

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


def bos(model: Any) -> None:
    from mechscope.features.store import token_rows
    from mechscope.locate.heads import repeated_tokens

    def loss(tokens: torch.Tensor, skip: int) -> float:
        with torch.no_grad():
            logits = model.forward(tokens)
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return float(-logp[:, skip:].mean())

    half = 20
    seqs = repeated_tokens(model, n=16, half_len=half, seed=0)  # [16, 1 + 2 * half]: the BOS first
    assert int(seqs[0, 0]) == model.tokenizer.bos_token_id
    print(f"repeated random tokens, loss on the repeated half: with BOS {loss(seqs, half):.2f}, ", end="")
    print(f"without {loss(seqs[:, 1:], half - 1):.2f}")
    texts = _docstrings(argparse, ast, dataclasses, inspect, json, pathlib, typing)
    rows = token_rows(model, texts, 64)[:32]  # stdlib docstrings, packed: the BOS first in each row
    with_bos, without = loss(rows, 1), loss(rows[:, 1:], 0)  # both over the rows' tokens 2..63
    print(f"packed English, {tuple(rows.shape)}, next-token loss: with BOS {with_bos:.2f}, without {without:.2f}")


def _docstrings(*modules: Any) -> list[str]:
    """The long docstrings (> 200 characters) of standard-library modules: English text every machine has."""
    texts = []
    for module in modules:
        tree = ast.parse(Path(str(module.__file__)).read_text())
        texts += [doc for node in ast.walk(tree) if len(doc := _docstring(node)) > 200]
    return texts


def _docstring(node: ast.AST) -> str:
    return (ast.get_docstring(node) or "") if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) else ""


def rome_section(model: Any) -> None:
    from mechscope.steer.editing import EditRequest, edit_metrics, rome

    request = EditRequest(
        prompt="{} is located in the city of",
        subject="The Eiffel Tower",
        target=" Rome",
        paraphrases=(
            "Tourists visiting The Eiffel Tower travel to the city of",
            "The Eiffel Tower, a famous landmark, stands in the city of",
        ),
    )
    start = time.perf_counter()
    record = rome(model, request)
    print(f"ROME in {time.perf_counter() - start:.1f} s (key statistics read from the cache after the first run)")
    for name, states in edit_metrics(model, [request], record, neighbourhood=True).summary().items():
        print(f"  {name:<26} " + "  ".join(f"{state} {value:.3f}" for state, value in states.items()))
    record.revert(model)


def means(model: Any) -> None:
    from mechscope.sites import Site
    from mechscope.steer import mean_difference

    positive = [
        "I loved this film, it was wonderful and moving.",
        "What a great day, everything went well.",
        "The food was delicious and the staff were kind.",
        "Brilliant!",
    ]
    negative = [
        "I hated this film; it was dull, long, badly acted and far too loud for anyone to enjoy it.",
        "What a terrible day, nothing at all went right from the morning until late at night.",
        "The food was cold and the staff were rude.",
        "Awful.",
    ]
    for layer in (3, 9, 15):
        site = Site("hook_resid_pre", layer)
        shipped = mean_difference(model, positive, negative, layers=layer, read="mean").directions[0].float()
        counted = []
        for texts in (positive, negative):
            batch = model.to_tokens(texts, padding_side="left")
            _, cache = model.run_with_cache(batch, [site])
            act, mask = cache[site.name].float(), batch["attention_mask"].float()[..., None]
            counted.append(((act * mask).sum(1) / mask.sum(1)).mean(0))
            first = batch["attention_mask"][0].argmax()
            norms = act[0, first + 1 :].norm(dim=-1)
        with_bos = counted[0] - counted[1]
        cos = float(torch.nn.functional.cosine_similarity(shipped, with_bos, dim=0))
        print(
            f"layer {layer}: BOS residual norm {float(act[0, first].norm()):.0f}, a text token's (median) "
            f"{float(norms.median()):.0f}; cos(mean-read vector, the same counting the BOS) {cos:.3f}"
        )
        _retain_overlap(model, positive + negative, site)
    _ablation_keeps_bos(model)


def _ablation_keeps_bos(model: Any) -> None:
    """IOI logit difference with one layer's attention output mean-ablated over the prompts' tokens."""
    from mechscope.steer import mean_ablation

    first = lambda words: [model.tokenizer.encode(w, add_special_tokens=False)[0] for w in words]  # noqa: E731
    metric = logit_diff_metric(first(ANSWERS), first(WRONG))
    batch = model.to_tokens(CLEAN, padding_side="left")
    score = lambda logits: float(metric(logits.detach()).mean())  # noqa: E731
    print(f"name-mover logit difference, clean: {score(model.forward(batch)):.3f}")
    for layer in (3, 9, 15):
        site = f"blocks.{layer}.hook_attn_out"
        with mean_ablation(model, site, reference=batch, over="tokens"):
            kept = score(model.forward(batch))
        _, cache = model.run_with_cache(batch, [site])
        real = batch["attention_mask"].bool()
        counted = cache[site].float()[real].mean(0)  # the BOS counted in the mean and overwritten by it
        with model.hooks({site: lambda act, _ctx, v=counted: v.to(act.dtype).expand_as(act)}):
            old = score(model.forward(batch))
        print(f"  layer {layer} attention output mean-ablated: BOS left out and kept {kept:.3f}; counted {old:.3f}")


def _retain_overlap(model: Any, texts: list[str], site: Any, k: int = 16) -> None:
    """How much of the refusal-direction search's retain subspace (top-k uncentred principal directions, text
    tokens only) survives when the BOS is counted, and how much of the latter's top direction is the BOS."""
    from mechscope.steer.selection import retain_subspace

    shipped = retain_subspace(model, texts, site, k)
    batch = model.to_tokens(texts)
    _, cache = model.run_with_cache(batch, [site])
    acts = cache[site.name].float()
    counted = torch.linalg.svd(acts[batch["attention_mask"].bool()], full_matrices=False)[2][:k]
    overlap = float((shipped @ counted.T).pow(2).sum()) / k  # mean squared cosine of principal angles
    bos = acts[0, batch["attention_mask"][0].argmax()]
    top = float(torch.nn.functional.cosine_similarity(counted[0], bos, dim=0).abs())
    print(
        f"  retain subspace (k={k}): overlap with the BOS-counted one {overlap:.3f}; "
        f"|cos| of the latter's top direction with the BOS residual {top:.3f}"
    )


def lens_section(model: Any, steps: int) -> None:
    from mechscope.locate import logit_lens
    from mechscope.locate.tuned_lens import TunedLensConfig, compare_lenses, token_windows, train_tuned_lens

    held_out = token_windows(model, _docstrings(json, pathlib, typing), seq_len=64, max_windows=8)
    lens = logit_lens(model, held_out, k=1, batch_size=1)  # [layer, 8, 64]: the BOS in column 0
    kl, real = lens["kl"].float(), lens["attention_mask"].float()
    counted = (kl * real).sum((1, 2)) / real.sum()
    text, at_bos = lens.mean_kl(), kl[:, :, 0].mean(1)
    layers = [0, 3, 6, 9, 12, 15, model.dims.n_layers - 1]
    print(f"logit lens on {tuple(held_out.shape)} held-out rows, KL(final || layer) in nats:")
    for layer in layers:
        print(
            f"  resid_pre {layer:<2}: text tokens {float(text[layer]):6.2f}   with the BOS counted "
            f"{float(counted[layer]):6.2f}   at the BOS {float(at_bos[layer]):6.2f}"
        )
    config = TunedLensConfig(steps=steps, batch_tokens=32, seq_len=64, max_windows=64)  # SmolLM2's run's
    start = time.perf_counter()
    tuned = train_tuned_lens(model, _docstrings(argparse, ast, dataclasses, inspect), config=config, progress=True)
    print(f"tuned lens: {steps} steps of {config.batch_tokens} tokens in {time.perf_counter() - start:.0f} s")
    kept = tuned.training_log["validation"]["kept_before"]
    print(f"  layers left as before training (worse on its held-out windows): {kept}")
    comparison = compare_lenses(model, held_out, tuned)
    for layer in layers:
        print(
            f"  resid_pre {layer:<2}: logit lens {float(comparison['logit_lens_kl'][layer]):6.2f}   "
            f"tuned lens {float(comparison['tuned_lens_kl'][layer]):6.2f}"
        )


def sae_section(model: Any, steps: int) -> None:
    from mechscope.data.corpus import english_texts
    from mechscope.features import SAEConfig, SAETrainConfig, train_sae
    from mechscope.features.evals import downstream_loss, reconstruction_metrics
    from mechscope.features.store import collect_activations

    site = "blocks.6.hook_resid_post"
    train_texts, held_out = english_texts("train"), english_texts("eval")  # the default English stream
    start = time.perf_counter()
    acts = collect_activations(model, site, train_texts, seq_len=64, max_tokens=100_000)  # BOS left out
    test = collect_activations(model, site, held_out, seq_len=64, max_tokens=20_000)
    print(
        f"{site}: {acts.shape[0]} training and {test.shape[0]} held-out tokens in {time.perf_counter() - start:.0f} s"
    )
    config = SAEConfig(d_in=model.dims.d_model, d_sae=4096, activation="topk", k=32, site=site)
    start = time.perf_counter()
    sae, _ = train_sae(acts, config, SAETrainConfig(steps=steps, batch_size=512, lr=5e-4), progress=True)
    print(f"TopK SAE (4096 features, k=32): {steps} steps of 512 tokens in {time.perf_counter() - start:.0f} s")
    metrics = reconstruction_metrics(sae, test)
    print("  held out: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("explained_variance", "l0", "dead_fraction")))
    losses = downstream_loss(model, sae, held_out, seq_len=64, max_rows=32)
    print("  next-token loss: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))


def eap_section(model: Any, top: int) -> None:
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
    strongest = values.abs().argsort(descending=True)[:top].tolist()
    random = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))[:top].tolist()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = ("bos", "eap", "rome", "means", "lens", "sae")
    parser.add_argument("--only", nargs="*", choices=sections, default=sections)
    parser.add_argument("--top", type=int, default=15, help="strongest edges (and as many random ones) checked")
    parser.add_argument("--lens-steps", type=int, default=60, help="training steps of the tuned lens")
    parser.add_argument("--sae-steps", type=int, default=3000, help="training steps of the SAE")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = ms.load_model("gemma3-270m")
    print(f"loaded in {time.perf_counter() - start:.1f} s: {model.dims.family}, {model.dims.n_layers} layers")
    for section in args.only:
        print(f"== {section}")
        if section == "bos":
            bos(model)
        elif section == "eap":
            eap_section(model, args.top)
        elif section == "rome":
            rome_section(model)
        elif section == "lens":
            lens_section(model, args.lens_steps)
        elif section == "sae":
            sae_section(model, args.sae_steps)
        else:
            means(model)


if __name__ == "__main__":
    main()
