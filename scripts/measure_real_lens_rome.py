"""Tuned lens vs logit lens, and ROME with paraphrases and neighbours, on SmolLM2-135M-Instruct.

Run (after scripts/install_real_models.sh):
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n 5 \
        .venv/bin/python scripts/measure_real_lens_rome.py --out real-figures [--only SECTION ...]

Sections (each writes ``<out>/<section>.json`` with every number, plus mechscope results and figures):

- ``tuned_lens``: trains a tuned lens on English text found locally (docstrings of Python standard
  library modules, split by module into training and held-out text; nothing is downloaded) and compares
  held-out ``KL(final || lens)`` per layer with the logit lens.
- ``rome_specificity``: one ROME edit (Germany's capital -> Rome) at three MLP layers, with four
  paraphrases and five neighbour capitals the unedited model gets right; each edit is reverted and the
  weights checked bit-for-bit against a snapshot taken before it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import time
from pathlib import Path

import torch

NAME = "smollm2-135m-instruct"

# Standard-library modules whose docstrings are the local English text stream.
DOC_MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "html", "http.client", "http.server", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "multiprocessing", "numbers", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
]  # fmt: skip


def docstring_texts() -> tuple[list[str], list[str]]:
    """Docstrings (>= 200 characters) of the modules above and their public members, split by module
    (every 5th module by name hash is held out)."""
    train: list[str] = []
    held: list[str] = []
    for name in sorted(DOC_MODULES):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [mod.__doc__ or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
        docs = [d.strip() for d in dict.fromkeys(docs) if len(d.strip()) >= 200]
        bucket = held if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0 else train
        bucket.extend(docs)
    return train, held


def tuned_lens(model, out: dict, folder: Path, steps: int, batch_tokens: int) -> None:
    from mechscope.locate.tuned_lens import TunedLensConfig, compare_lenses, token_windows, train_tuned_lens

    train, held = docstring_texts()
    cfg = TunedLensConfig(steps=steps, batch_tokens=batch_tokens, seq_len=64, max_windows=64, lr=1e-3)
    start = time.perf_counter()
    lens = train_tuned_lens(model, train, config=cfg)
    train_s = time.perf_counter() - start
    lens.save(folder / "smollm2_tuned_lens.safetensors")
    held_windows = token_windows(model, held, seq_len=64, max_windows=8)
    start = time.perf_counter()
    cmp = compare_lenses(model, {"input_ids": held_windows, "attention_mask": torch.ones_like(held_windows)}, lens)
    eval_s = time.perf_counter() - start
    cmp.save(folder / "tuned_vs_logit_lens.safetensors")
    try:
        cmp.plot(title="SmolLM2-135M-Instruct: held-out KL(final || lens) per layer").write_html(
            folder / "tuned_vs_logit_lens.html", include_plotlyjs="cdn"
        )
    except Exception as exc:  # plotting is optional
        print(f"plot skipped: {exc}")
    logit = cmp["logit_lens_kl"].tolist()
    tuned = cmp["tuned_lens_kl"].tolist()
    out["tuned_lens"] = {
        "text": "docstrings of Python stdlib modules (held out by module)",
        "n_train_docs": len(train),
        "n_heldout_docs": len(held),
        "config": {"steps": steps, "batch_tokens": batch_tokens, "seq_len": 64, "max_windows": 64, "lr": 1e-3},
        "train_tokens": lens.training_log["n_tokens"],
        "heldout_tokens": int(held_windows.numel()),
        "loss_first": round(lens.training_log["loss_first"], 4),
        "loss_last": round(lens.training_log["loss_last"], 4),
        "validation_windows": lens.training_log.get("validation", {}).get("windows", 0),
        "layers_kept_before_training": lens.training_log.get("validation", {}).get("kept_before", []),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "threads": torch.get_num_threads(),
        "logit_lens_kl": [round(v, 4) for v in logit],
        "tuned_lens_kl": [round(v, 4) for v in tuned],
        "layers_tuned_better": sum(t < g for t, g in zip(tuned[:-1], logit[:-1])),
        "mean_kl_logit": round(sum(logit[:-1]) / (len(logit) - 1), 4),
        "mean_kl_tuned": round(sum(tuned[:-1]) / (len(tuned) - 1), 4),
    }


NEIGHBOURS = (
    ("The capital of France is", " Paris"),
    ("The capital of Spain is", " Madrid"),
    ("The capital of Japan is", " Tokyo"),
    ("The capital of Austria is", " Vienna"),
    ("The capital of Greece is", " Athens"),
)
PARAPHRASES = (
    "Germany's capital city is",
    "The capital city of Germany is",
    "In Germany, the capital is",
    "The seat of the government of Germany is in the city of",
)


def rome_specificity(model, out: dict, folder: Path, layers: tuple[int, ...]) -> None:
    from mechscope.steer.editing.metrics import edit_metrics
    from mechscope.steer.editing.records import equal_to_snapshot, snapshot
    from mechscope.steer.editing.requests import EditRequest
    from mechscope.steer.editing.rome import ROMEConfig, rome
    from mechscope.steer.editing.stats import StatsConfig

    # the neighbours must be right before the edit (checked here, reported)
    with torch.no_grad():
        batch = model.to_tokens([p for p, _ in NEIGHBOURS], padding_side="left")
        top = model(batch)[:, -1].argmax(-1)
    neighbour_tops = [model.to_string([int(t)]) for t in top]
    request = EditRequest(
        prompt="The capital of {} is", subject="Germany", target=" Rome", paraphrases=PARAPHRASES, neighbours=NEIGHBOURS
    )
    per_layer = {}
    start = time.perf_counter()
    for layer in layers:
        snap = snapshot(model)
        t0 = time.perf_counter()
        record = rome(model, request, ROMEConfig(layer=layer, stats=StatsConfig(n_tokens=10_000, stream="zoo")))
        edit_s = time.perf_counter() - t0
        changed = equal_to_snapshot(model, snap)
        metrics = edit_metrics(model, record=record)  # reverts, measures before, re-applies, measures after
        record.revert(model)
        restored = equal_to_snapshot(model, snap)
        metrics.save(folder / f"rome_specificity_layer{layer}.safetensors")
        per_layer[layer] = {
            **{name: {k: round(v, 4) for k, v in d.items()} for name, d in metrics.summary().items()},
            "params_changed_by_edit": changed,
            "params_differing_after_revert": restored,
            "edit_seconds": round(edit_s, 1),
        }
        del snap
    out["rome_specificity"] = {
        "request": {"prompt": request.prompt, "subject": request.subject, "target": request.target},
        "paraphrases": list(PARAPHRASES),
        "neighbours": [list(n) for n in NEIGHBOURS],
        "neighbour_top1_before": neighbour_tops,
        "stats_tokens": 10_000,
        "by_layer": per_layer,
        "seconds": round(time.perf_counter() - start, 1),
    }


SECTIONS = ["tuned_lens", "rome_specificity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("real-figures"))
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lens-steps", type=int, default=60)
    parser.add_argument("--lens-batch-tokens", type=int, default=32)
    parser.add_argument("--rome-layers", type=int, nargs="+", default=[2, 6, 14])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    from mechscope import load_model

    model = load_model(NAME)
    for label in args.only or SECTIONS:
        out: dict = {"model": NAME}
        start = time.perf_counter()
        if label == "tuned_lens":
            tuned_lens(model, out, args.out, args.lens_steps, args.lens_batch_tokens)
        else:
            rome_specificity(model, out, args.out, tuple(args.rome_layers))
        print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
        (args.out / f"{label}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(json.dumps(out, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
