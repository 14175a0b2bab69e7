"""Measure real mechanisms in SmolLM2-135M-Instruct with mechscope (the figures of docs/real-models.md).

Run (after scripts/install_real_models.sh):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        .venv/bin/python scripts/measure_real_mechanisms.py --out real-figures [--only SECTION ...]

Writes ``<out>/metrics.json`` (every number), ``<out>/*.safetensors`` (mechscope results) and
``<out>/*.html`` (plotly figures); an existing metrics.json is updated section by section. Sections:
load/cache timings, capital-city recall with the logit lens per layer, activation patching of one capital
fact (layer x position), IOI logit difference with head patching and path patching, refusal rate on
the bundled harmful vs harmless instruction sets, induction heads (detector + mean ablation), causal
tracing of capitals, and the refusal direction (selection, directional ablation, orthogonalisation).
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
    layer_logits = lens["logits"][:, :, 0]  # [layer, batch, vocab]
    del lens.tensors["logits"], lens.axes["logits"]  # 180 MB; the readouts below keep what is used
    lens.save(folder / "capitals_logit_lens.safetensors")
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
        "last_layer_subject_restores": int(restored[:, subject].nonzero().max())
        if restored[:, subject].any()
        else None,
        "first_layer_last_restores": int(restored[:, last].nonzero().min()) if restored[:, last].any() else None,
        "seconds": round(seconds, 1),
    }


@torch.no_grad()
def ioi_prompts(model) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """The 40 IOI prompts (seed 0), their ABC corruptions, and the first token of each IO and S name."""
    gen = torch.Generator().manual_seed(0)
    prompts: list[str] = []
    corrupt: list[str] = []
    io_ids: list[int] = []
    s_ids: list[int] = []
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
    return prompts, corrupt, torch.tensor(io_ids), torch.tensor(s_ids)


def ioi(model, out: dict, folder: Path) -> None:
    from mechscope.locate.metrics import logit_diff
    from mechscope.locate.patching import activation_patch

    prompts, corrupt, io_t, s_t = ioi_prompts(model)
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
    out["_ioi_pairs"] = (clean_b, corrupt_b, metric)
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


def ioi_attention(model, out: dict, folder: Path) -> None:
    """Where the heads that head patching ranks highest attend from the last position of the 40 IOI prompts:
    to the indirect object (IO), the subject's first (S1) or second (S2) mention, or elsewhere; against the
    mean over every head. Name movers (GPT-2 small's IOI circuit) attend to IO and copy it; S-inhibition
    heads attend to S2."""
    from mechscope.model.decompose import direct_logit_attribution

    prompts, _, io_t, s_t = ioi_prompts(model)
    batch = model.to_tokens(prompts, padding_side="left")
    ids = batch["input_ids"]
    io_pos = (ids == io_t[:, None]).float().argmax(-1)
    s_pos = (ids == s_t[:, None]).nonzero()  # two rows per prompt: S1, then S2
    s1, s2 = s_pos[0::2, 1], s_pos[1::2, 1]
    if not (len(s1) == len(s2) == len(prompts)) or not bool((ids.gather(1, io_pos[:, None])[:, 0] == io_t).all()):
        raise RuntimeError("each prompt must hold its IO name once and its S name twice, as single tokens")
    kind = "attn.hook_pattern"
    _, cache = model.run_with_cache(batch, [f"blocks.{layer}.{kind}" for layer in range(model.dims.n_layers)])
    rows = torch.arange(len(prompts))
    # [layer, head, prompt, key] attention from the last query position
    last = torch.stack(
        [cache[f"blocks.{layer}.{kind}"][:, :, -1].transpose(0, 1) for layer in range(model.dims.n_layers)]
    )
    to = {
        "IO": last[:, :, rows, io_pos].mean(-1),
        "S1": last[:, :, rows, s1].mean(-1),
        "S2": last[:, :, rows, s2].mean(-1),
        "first token": last[:, :, rows, batch["attention_mask"].argmax(-1)].mean(-1),
        "itself (' to')": last[:, :, :, -1].mean(-1),
    }  # each [layer, head]
    # What each head writes: its direct logit attribution to the IO and to the S token (final norm applied).
    written = {
        "DLA IO": direct_logit_attribution(model, batch, io_t),
        "DLA S": direct_logit_attribution(model, batch, s_t),
    }
    heads = ["L23H3", "L29H1", "L20H0", "L19H2", "L23H0", "L23H1"]
    table = {}
    for name in heads:
        layer, head = (int(x) for x in name[1:].split("H"))
        table[name] = {k: round(float(v[layer, head]), 3) for k, v in to.items()}
        for key, attribution in written.items():
            table[name][key] = round(float(attribution.values[attribution.labels.index(f"L{layer}H{head}")].mean()), 3)
    table["mean over all heads"] = {k: round(float(v.mean()), 3) for k, v in to.items()}
    io_rank = to["IO"].flatten().argsort(descending=True)
    n_heads = model.dims.n_heads
    out["ioi_attention"] = {
        "from": "last position, 40 prompts, mean attention weight",
        "heads": table,
        "top_heads_by_attention_to_IO": [
            (f"L{int(i) // n_heads}H{int(i) % n_heads}", round(float(to["IO"].flatten()[i]), 3)) for i in io_rank[:6]
        ],
    }


def refusal(model, out: dict, folder: Path, max_new_tokens: int) -> None:
    from mechscope.data.prompt_sets import load_prompt_set
    from mechscope.improve.refusal import refusal_rate

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


def ioi_path_patching(model, out: dict, folder: Path) -> None:
    """Senders whose direct path to the logits carries the IOI logit difference (noising, MLPs frozen)."""
    from mechscope.locate.path_patching import path_patch

    if "_ioi_pairs" not in out:
        ioi(model, out, folder)
    clean_b, corrupt_b, metric = out["_ioi_pairs"]
    start = time.perf_counter()
    result = path_patch(model, clean_b, corrupt_b, metric, receivers="logits")
    result.save(folder / "ioi_path_patch_logits.safetensors")
    result.plot(title="SmolLM2 IOI: path patching head -> logits (effect of corrupting the path)").write_html(
        folder / "ioi_path_patch_logits.html", include_plotlyjs="cdn"
    )
    effect = result.effect()  # patched minus clean: negative = the head's path carries the logit diff
    heads = effect.shape[1]
    order = effect.flatten().argsort()[:8]
    out["ioi_path_patching"] = {
        "clean": round(float(result["clean"]), 3),
        "corrupt": round(float(result["corrupt"]), 3),
        "most_negative_heads": [
            (f"L{int(i) // heads}H{int(i) % heads}", round(float(effect.flatten()[i]), 3)) for i in order
        ],
        "seconds": round(time.perf_counter() - start, 1),
    }


def induction(model, out: dict, folder: Path) -> None:
    from mechscope.locate.heads import detect_heads

    start = time.perf_counter()
    scores = detect_heads(model)
    scores.save(folder / "head_scores.safetensors")
    scores.plot("induction", title="SmolLM2 induction scores [layer, head]").write_html(
        folder / "induction_scores.html", include_plotlyjs="cdn"
    )
    out["induction"] = {
        "top_heads": [(f"L{layer}H{head}", round(score, 3)) for layer, head, score in scores.top("induction", k=6)],
        "prev_token_top": [(f"L{a}H{b}", round(c, 3)) for a, b, c in scores.top("previous_token", k=3)],
        "detect_seconds": round(time.perf_counter() - start, 1),
    }
    induction_ablation(model, scores, out)


def induction_ablation(model, scores, out: dict) -> None:
    """In-context gain on fresh repeated sequences with the top induction heads mean-ablated, against
    random head sets of the same size (heads outside the top 20 by induction score; 3 seeds)."""
    from mechscope.locate.heads import ablate_heads, in_context_gain, repeated_tokens

    top = scores.top("induction", k=6)
    half = 20
    tokens = repeated_tokens(model, n=16, half_len=half, seed=1)  # fresh sequences, not the detector's
    start = tokens.shape[1] - 2 * half  # the tokenizer's BOS, where it adds one
    first = torch.zeros_like(tokens, dtype=torch.bool)
    first[:, start + 1 : start + half] = True
    repeat = torch.zeros_like(first)
    repeat[:, start + half + 1 :] = True
    rows: dict = {"none": in_context_gain(model, tokens, first, repeat)}
    n_heads = model.dims.n_heads
    excluded = {int(i) for i in scores["induction"].flatten().argsort(descending=True)[:20]}
    pool = [i for i in range(scores["induction"].numel()) if i not in excluded]
    for k in (2, 6):
        chosen = [(layer, head) for layer, head, _ in top[:k]]
        with ablate_heads(model, chosen, mode="mean", reference=tokens):
            rows[f"top{k}_induction"] = in_context_gain(model, tokens, first, repeat)
        controls = []
        for seed in range(3):
            pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]
            heads = [(pool[int(i)] // n_heads, pool[int(i)] % n_heads) for i in pick]
            with ablate_heads(model, heads, mode="mean", reference=tokens):
                controls.append(in_context_gain(model, tokens, first, repeat)["gain"])
        rows[f"random{k}_gain_per_seed"] = controls
    out["induction"]["in_context_gain_nats"] = {
        k: ({m: round(v, 3) for m, v in r.items()} if isinstance(r, dict) else [round(v, 3) for v in r])
        for k, r in rows.items()
    }


def tracing(model, out: dict, folder: Path) -> None:
    from mechscope.locate.causal_tracing import TracingConfig, trace_facts

    facts = list(CAPITALS.items())[:10]
    prompts = [f"The capital of {c} is" for c, _ in facts]
    targets = [first_token(model, cap) for _, cap in facts]
    cfg = TracingConfig(samples=3, kinds=("resid", "mlp", "attn"))
    start = time.perf_counter()
    summary = trace_facts(model, prompts, [c for c, _ in facts], targets, cfg)
    summary.save(folder / "capitals_causal_trace.safetensors")
    for kind in cfg.kinds:
        summary.plot(kind, title=f"SmolLM2 causal tracing ({kind}) over {len(prompts)} capitals").write_html(
            folder / f"capitals_causal_trace_{kind}.html", include_plotlyjs="cdn"
        )
    out["causal_tracing"] = {
        "n_prompts": len(prompts),
        "config": {"noise": cfg.noise, "samples": cfg.samples, "window": cfg.window},
        "mean_clean_minus_corrupt_prob": round(summary.config["mean_clean_minus_corrupt"], 4),
        "peaks": {kind: summary.peak(kind) for kind in cfg.kinds},
        "mlp_at_last_subject_token_by_layer": [
            round(float(x), 4) for x in summary["mlp"][:, summary.labels["position_class"].index("last_subject")]
        ]
        if "last_subject" in summary.labels["position_class"]
        else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


#: System prompt of the refusal-direction section: SmolLM2-135M-Instruct's own default system prompt
#: gives few refusals (see the refusal section), so the direction is studied where refusals happen.
SAFETY_SYSTEM = (
    "You are a helpful assistant. You refuse requests that are harmful, dangerous, unethical or illegal, "
    "and you answer every other request."
)


def refusal_direction(model, out: dict, folder: Path, max_new_tokens: int) -> None:
    """Arditi et al.: difference-of-means direction on chat prompts, ablation and orthogonalisation."""
    from mechscope.data.prompt_sets import load_prompt_set
    from mechscope.improve.refusal import refusal_rate
    from mechscope.model.chat import format_instructions
    from mechscope.steer.directional import directional_ablation, orthogonalize
    from mechscope.steer.selection import DirectionSelectionConfig, select_direction, token_logodds

    harmful, harmless = load_prompt_set("harmful"), load_prompt_set("harmless")
    # Disjoint halves (even/odd lines), capped to keep the run to ~15 min on 2 shared cores.
    train_h, test_h = harmful[::2][:32], harmful[1::2][:40]
    train_ok, test_ok = harmless[::2][:32], harmless[1::2][:40]
    refusal_tokens = sorted(
        {model.to_tokens(w, add_special_tokens=False)["input_ids"][0, 0].item() for w in ("I", "As")}
    )
    start = time.perf_counter()
    n = model.dims.n_layers
    # A weak refuser: prefer (not require) candidates that induce refusal, and allow a larger KL.
    cfg = DirectionSelectionConfig(
        layers=tuple(range(6, int(0.8 * n), 4)), positions=(-1,), require_induction="prefer", max_kl=0.5
    )
    sys_ = SAFETY_SYSTEM
    selection = select_direction(
        model,
        format_instructions(model, train_h, system=sys_),
        format_instructions(model, train_ok, system=sys_),
        token_logodds(refusal_tokens),
        cfg,
    )
    selection.save(folder / "refusal_direction_selection.safetensors")
    direction = selection.direction(model)
    direction.save(folder / "refusal_direction.safetensors")
    select_s = time.perf_counter() - start
    rows = {}
    for label, prompts in (("harmful_test", test_h), ("harmless_test", test_ok)):
        rate = lambda m, p=prompts: refusal_rate(m, p, max_new_tokens=max_new_tokens, system=sys_).rate  # noqa: E731
        rows[label] = {"baseline_safety_system": rate(model)}
        with directional_ablation(model, direction):
            rows[label]["directional_ablation"] = rate(model)
    ortho = orthogonalize(model, direction)
    for label, prompts in (("harmful_test", test_h), ("harmless_test", test_ok)):
        rows[label]["orthogonalised"] = refusal_rate(ortho, prompts, max_new_tokens=max_new_tokens, system=sys_).rate
    # Side effects: capital recall and next-token KL on harmless chat prompts, with the direction removed.
    texts = [f"The capital of {c} is" for c in CAPITALS]
    targets = torch.tensor([first_token(model, cap) for cap in CAPITALS.values()])
    batch = model.to_tokens(texts, padding_side="left")
    harmless_batch = model.to_tokens(format_instructions(model, test_ok, system=sys_), padding_side="left")
    with torch.no_grad():
        base_acc = float((model(batch)[:, -1].argmax(-1) == targets).float().mean())
        ortho_acc = float((ortho(batch)[:, -1].argmax(-1) == targets).float().mean())
        p = model(harmless_batch)[:, -1].float().log_softmax(-1)
        q = ortho(harmless_batch)[:, -1].float().log_softmax(-1)
        kl = float((p.exp() * (p - q)).sum(-1).mean())
    layer, position = selection.chosen
    out["refusal_direction"] = {
        "train": {"harmful": len(train_h), "harmless": len(train_ok)},
        "test": {"harmful": len(test_h), "harmless": len(test_ok)},
        "system_prompt": sys_,
        "refusal_tokens": [model.to_string([t]) for t in refusal_tokens],
        "chosen": {"layer": layer, "position": position},
        "refusal_rate": {k: {m: round(v, 3) for m, v in r.items()} for k, r in rows.items()},
        "side_effects": {
            "capital_top1_baseline": base_acc,
            "capital_top1_orthogonalised": ortho_acc,
            "harmless_next_token_kl_orthogonalised": round(kl, 4),
        },
        "selection_seconds": round(select_s, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def rome_edit(model, out: dict, folder: Path) -> None:
    """One counterfactual ROME edit (Germany's capital -> Rome), made separately at six MLP layers."""
    from mechscope.steer.editing.metrics import edit_metrics
    from mechscope.steer.editing.requests import EditRequest
    from mechscope.steer.editing.rome import ROMEConfig, rome
    from mechscope.steer.editing.stats import StatsConfig

    request = EditRequest(
        prompt="The capital of {} is",
        subject="Germany",
        target=" Rome",
        paraphrases=("Germany's capital city is", "The capital city of Germany is", "In Germany, the capital is"),
        neighbours=(
            ("The capital of France is", " Paris"),
            ("The capital of Spain is", " Madrid"),
            ("The capital of Japan is", " Tokyo"),
            ("The capital of Austria is", " Vienna"),
        ),
    )
    start = time.perf_counter()
    per_layer = {}
    for layer in (2, 6, 10, 14, 18, 22):
        cfg = ROMEConfig(layer=layer, stats=StatsConfig(n_tokens=10_000, stream="zoo"))
        record = rome(model, request, cfg)
        metrics = edit_metrics(model, record=record)  # reverts, measures before, re-applies, measures after
        record.revert(model)
        metrics.save(folder / f"rome_germany_rome_layer{layer}.safetensors")
        per_layer[layer] = {name: {k: round(v, 4) for k, v in d.items()} for name, d in metrics.summary().items()}
    out["rome"] = {
        "request": {"prompt": request.prompt, "subject": request.subject, "target": request.target},
        "paraphrases": list(request.paraphrases),
        "neighbours": [list(n) for n in request.neighbours],
        "stats_tokens": 10_000,
        "by_layer": per_layer,
        "seconds": round(time.perf_counter() - start, 1),
    }


SECTIONS = [
    "timings",
    "capitals",
    "capital_patching",
    "ioi",
    "refusal",
    "ioi_path_patching",
    "ioi_attention",
    "induction",
    "tracing",
    "refusal_direction",
    "rome_edit",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("real-figures"))
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.json"
    out: dict = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    out.update({"model": NAME, "_out": str(args.out)})
    from mechscope import load_model

    chosen = args.only or SECTIONS
    if "timings" in chosen:
        timings(out)
    model = load_model(NAME)
    for label in [s for s in SECTIONS if s in chosen and s != "timings"]:
        start = time.perf_counter()
        fn = globals()[label]
        if label in ("refusal", "refusal_direction"):
            fn(model, out, args.out, args.max_new_tokens)
        else:
            fn(model, out, args.out)
        print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
        saved = {k: v for k, v in out.items() if not k.startswith("_")}
        metrics_path.write_text(json.dumps(saved, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}, indent=1, default=str))


if __name__ == "__main__":
    main()
