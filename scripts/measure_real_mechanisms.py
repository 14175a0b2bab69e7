"""Measure real mechanisms in SmolLM2-135M-Instruct with mechscope (the figures of docs/real-models.md).

Run (after scripts/install_real_models.sh):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        .venv/bin/python scripts/measure_real_mechanisms.py --out real-figures [--skip-refusal]

Writes ``<out>/metrics.json`` (every number), ``<out>/*.safetensors`` (mechscope results) and
``<out>/*.html`` (plotly figures). Sections: load/cache timings, capital-city recall, logit lens per
layer on the capitals, activation patching of one capital fact (layer x position), an IOI-style logit
difference with names, and the refusal rate on the bundled harmful vs harmless instruction sets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

NAME = "smollm2-135m-instruct"

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Russia": "Moscow",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Kenya": "Nairobi",
    "Argentina": "Buenos",
    "Peru": "Lima",
    "Cuba": "Havana",
    "Belgium": "Brussels",
    "Denmark": "Copenhagen",
    "Turkey": "Ankara",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "India": "New",
    "Mexico": "Mexico",
    "England": "London",
}
NAMES = ["Mary", "John", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Peter", "Lucy", "Mark", "Kate"]
PLACES = ["store", "park", "school", "beach", "market", "library"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key"]


def first_token(model, word: str) -> int:
    return int(model.to_tokens(" " + word, add_special_tokens=False)["input_ids"][0, 0])


def timings(out: dict) -> None:
    from mechscope import load_model
    from mechscope.model import real_models as rm
    from mechscope.model.gguf import gguf_to_folder

    path = rm.gguf_path(NAME)
    tmp_cache = Path(out["_out"]) / "fresh-cache"
    start = time.perf_counter()
    gguf_to_folder(path, cache_dir=tmp_cache)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    gguf_to_folder(path, cache_dir=tmp_cache)
    reuse_full_s = time.perf_counter() - start
    start = time.perf_counter()
    gguf_to_folder(path, cache_dir=tmp_cache, verify="size")
    reuse_size_s = time.perf_counter() - start
    start = time.perf_counter()
    load_model(path, cache_dir=tmp_cache)
    load_s = time.perf_counter() - start
    import shutil

    shutil.rmtree(tmp_cache, ignore_errors=True)
    out["timings"] = {
        "first_conversion_s": round(convert_s, 2),
        "reuse_verify_full_s": round(reuse_full_s, 3),
        "reuse_verify_size_s": round(reuse_size_s, 4),
        "second_load_model_s": round(load_s, 2),
        "ratio_second_load_to_first_conversion": round(load_s / convert_s, 4),
    }


@torch.no_grad()
def capitals(model, out: dict, folder: Path) -> None:
    from mechscope.locate.lens import logit_lens

    texts = [f"The capital of {c} is" for c in CAPITALS]
    targets = torch.tensor([first_token(model, cap) for cap in CAPITALS.values()])
    batch = model.to_tokens(texts, padding_side="left")
    logits = model(batch)[:, -1]
    top = logits.argmax(-1)
    probs = logits.float().softmax(-1)[torch.arange(len(texts)), targets]
    out["capitals"] = {
        "n": len(texts),
        "top1_accuracy": float((top == targets).float().mean()),
        "mean_prob_correct": float(probs.mean()),
        "misses": {c: model.to_string([int(t)]) for c, t, ok in zip(CAPITALS, top, top == targets) if not ok},
    }
    lens = logit_lens(model, batch, positions=[-1], k=1, keep_logits=True)
    lens.save(folder / "capitals_logit_lens.safetensors")
    layer_logits = lens["logits"][:, :, 0]  # [layer, batch, vocab]
    lp = layer_logits.log_softmax(-1)
    p_correct = lp.exp()[:, torch.arange(len(texts)), targets]  # [layer, batch]
    rank = (layer_logits > layer_logits[:, torch.arange(len(texts)), targets][..., None]).sum(-1)  # [layer, batch]
    out["logit_lens"] = {
        "layers": lens.labels["layer"],
        "mean_prob_correct": [round(float(x), 4) for x in p_correct.mean(1)],
        "top1_fraction": [round(float(x), 3) for x in (rank == 0).float().mean(1)],
        "median_rank": [int(x) for x in rank.float().median(1).values],
        "kl_to_final": [round(float(x), 3) for x in lens["kl"][:, :, 0].mean(1)],
    }
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=lens.labels["layer"], y=out["logit_lens"]["mean_prob_correct"], name="p(capital)"))
    fig.add_trace(go.Scatter(x=lens.labels["layer"], y=out["logit_lens"]["top1_fraction"], name="top-1 fraction"))
    fig.update_layout(title=f"SmolLM2-135M-Instruct logit lens on {len(texts)} capitals", xaxis_title="layer")
    fig.write_html(folder / "capitals_logit_lens.html", include_plotlyjs="cdn")


def capital_patching(model, out: dict, folder: Path) -> None:
    from mechscope.locate.metrics import logit_diff
    from mechscope.locate.patching import activation_patch

    clean, corrupt = "The capital of Germany is", "The capital of France is"
    berlin, paris = first_token(model, "Berlin"), first_token(model, "Paris")
    c, k = model.to_tokens([clean]), model.to_tokens([corrupt])
    assert c["input_ids"].shape == k["input_ids"].shape, "clean and corrupt must have equal token length"
    metric = lambda lg: logit_diff(lg, berlin, paris)  # noqa: E731
    start = time.perf_counter()
    result = activation_patch(model, c, k, "resid_pre", metric, per_position=False)
    seconds = time.perf_counter() - start
    result.save(folder / "capital_patch_resid_pre.safetensors")
    result.plot(title="SmolLM2: patch clean resid_pre into 'France' run, logit(Berlin)-logit(Paris)").write_html(
        folder / "capital_patch_resid_pre.html", include_plotlyjs="cdn"
    )
    norm = result.normalised()  # [layer, pos], 1 = clean behaviour restored
    tokens = model.to_str_tokens(clean)
    subject = tokens.index(" Germany")
    last = len(tokens) - 1
    restored = norm > 0.5
    out["capital_patching"] = {
        "clean": clean,
        "corrupt": corrupt,
        "tokens": tokens,
        "clean_logit_diff": round(float(result["clean"]), 3),
        "corrupt_logit_diff": round(float(result["corrupt"]), 3),
        "normalised_at_subject_by_layer": [round(float(x), 3) for x in norm[:, subject]],
        "normalised_at_last_by_layer": [round(float(x), 3) for x in norm[:, last]],
        "last_layer_subject_restores": int(restored[:, subject].nonzero().max()) if restored[:, subject].any() else None,
        "first_layer_last_restores": int(restored[:, last].nonzero().min()) if restored[:, last].any() else None,
        "seconds": round(seconds, 1),
    }


@torch.no_grad()
def ioi(model, out: dict, folder: Path) -> None:
    from mechscope.locate.metrics import logit_diff
    from mechscope.locate.patching import activation_patch

    gen = torch.Generator().manual_seed(0)
    prompts, corrupt, io_ids, s_ids = [], [], [], []
    while len(prompts) < 40:
        a, b, c = (NAMES[int(i)] for i in torch.randperm(len(NAMES), generator=gen)[:3])
        place = PLACES[int(torch.randint(len(PLACES), (1,), generator=gen))]
        obj = OBJECTS[int(torch.randint(len(OBJECTS), (1,), generator=gen))]
        text = f"When {a} and {b} went to the {place}, {b} gave a {obj} to"
        # Corrupt ("ABC"): the repeated name replaced by a third one, so no name is the indirect object.
        bad = f"When {a} and {b} went to the {place}, {c} gave a {obj} to"
        prompts.append(text)
        corrupt.append(bad)
        io_ids.append(first_token(model, a))
        s_ids.append(first_token(model, b))
    io_t, s_t = torch.tensor(io_ids), torch.tensor(s_ids)
    batch = model.to_tokens(prompts, padding_side="left")
    diffs = logit_diff(model(batch), io_t, s_t)
    out["ioi"] = {
        "n": len(prompts),
        "template": "When {A} and {B} went to the {place}, {B} gave a {object} to  -> {A}",
        "mean_logit_diff": round(float(diffs.mean()), 3),
        "std_logit_diff": round(float(diffs.std()), 3),
        "fraction_positive": float((diffs > 0).float().mean()),
    }
    # Head patching: equal-length clean/corrupt pairs only (names are single tokens, so all are).
    k = model.to_tokens(corrupt, padding_side="left")
    same = (batch["attention_mask"] == k["attention_mask"]).all(-1)
    idx = same.nonzero().flatten()[:16]
    clean_b = {key: v[idx] for key, v in batch.items()}
    corrupt_b = {key: v[idx] for key, v in k.items()}
    metric = lambda lg: logit_diff(lg, io_t[idx], s_t[idx]).mean()  # noqa: E731
    start = time.perf_counter()
    with torch.enable_grad():
        result = activation_patch(model, clean_b, corrupt_b, "heads", metric, positions=[-1])
    seconds = time.perf_counter() - start
    result.save(folder / "ioi_patch_heads.safetensors")
    result.plot(title="SmolLM2 IOI: patch clean head outputs (last position) into ABC runs").write_html(
        folder / "ioi_patch_heads.html", include_plotlyjs="cdn"
    )
    norm = result.normalised()  # [layer, head]
    order = norm.flatten().argsort(descending=True)[:8]
    heads = norm.shape[1]
    out["ioi"]["patching"] = {
        "n_pairs": len(idx),
        "clean": round(float(result["clean"]), 3),
        "corrupt": round(float(result["corrupt"]), 3),
        "top_heads": [(f"L{int(i) // heads}H{int(i) % heads}", round(float(norm.flatten()[i]), 3)) for i in order],
        "seconds": round(seconds, 1),
    }


def refusal(model, out: dict, folder: Path, max_new_tokens: int) -> None:
    from mechscope.model.chat import load_prompt_set, refusal_rate

    out["refusal"] = {"max_new_tokens": max_new_tokens}
    for name in ("harmful", "harmless"):
        start = time.perf_counter()
        result = refusal_rate(model, load_prompt_set(name), max_new_tokens=max_new_tokens, batch_size=16)
        result.save(folder / f"refusal_{name}.safetensors")
        out["refusal"][name] = {
            "n": len(result.replies),
            "refusal_rate": round(result.rate, 3),
            "seconds": round(time.perf_counter() - start, 1),
            "examples": [
                (p, r[:120])
                for p, r in list(zip(result.labels["prompt"], result.replies))[:: max(1, len(result.replies) // 4)]
            ],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("real-figures"))
    parser.add_argument("--skip-refusal", action="store_true")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    out: dict = {"model": NAME, "_out": str(args.out)}
    from mechscope import load_model

    if not args.skip_timings:
        timings(out)
    model = load_model(NAME)
    sections = [("capitals", capitals), ("capital_patching", capital_patching), ("ioi", ioi)]
    for label, fn in sections:
        start = time.perf_counter()
        fn(model, out, args.out)
        print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
    if not args.skip_refusal:
        refusal(model, out, args.out, args.max_new_tokens)
    out.pop("_out")
    (args.out / "metrics.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
