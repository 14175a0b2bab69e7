"""The features pipeline on a real model: SmolLM2-135M-Instruct, one mid-layer residual site.

Collects activations of ``blocks.15.hook_resid_post`` over local English (docstrings of the installed
Python packages, read with ``ast``; nothing downloaded) into a bf16 store, trains a BatchTopK SAE from the
store, and reports: collection time and disk size, training time, held-out L0 / FVU / loss recovered /
dead and dense fractions, descriptions with detection and causal scores for a sample of features (the
token-statistics baseline for all, SmolLM2 itself as explainer for a few), and writes the dashboard.

    python benchmarks/bench_sae_smollm2.py --tokens 250000 --out .cache/sae-smollm2
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import re
import statistics
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch

SITE = "blocks.15.hook_resid_post"


def docstrings(held_out: bool) -> Iterator[str]:
    """Docstrings (>= 200 characters) of the installed packages' modules; a file is held out when its
    path's sha256 is 0 mod 10."""
    yield from _docstrings_under(Path(torch.__file__).resolve().parents[1], held_out)


def corpus(held_out: bool) -> Iterator[str]:
    """The collection corpus: the installed packages' docstrings (about 9.2 M SmolLM2 tokens in the
    training split), then the Python standard library's (its ``site-packages`` left out), with the same
    held-out rule. Deterministic, so a resumed collection re-reads the same rows."""
    yield from docstrings(held_out)
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    yield from _docstrings_under(stdlib, held_out, skip=("site-packages",))
    yield from man_paragraphs(held_out)


_TROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\\[[^]]*\]|\\[&|^%:/,0~]|\\s[+-]?\d")


def _untroff(line: str) -> str:
    return _TROFF_ESCAPE.sub("", line).replace("\\-", "-").replace("\\e", "\\").strip()


def man_paragraphs(held_out: bool) -> Iterator[str]:
    """Paragraphs (>= 200 characters) of the English manual pages under ``/usr/share/man/man*`` with the
    troff markup stripped (a crude reading: macro lines give their arguments, escapes are dropped); the
    same held-out rule by path."""
    root = Path("/usr/share/man")
    for path in sorted(root.glob("man*/*.gz")):
        if (int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 10 == 0) != held_out:
            continue
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        words: list[str] = []
        for line in text.splitlines():
            if line.startswith((".", "'")):
                macro, _, rest = line[1:].partition(" ")
                if macro in ("PP", "P", "LP", "SH", "SS", "TP", "IP", "sp", "br", "nf", "fi", "TH"):
                    paragraph = " ".join(words)
                    words = []
                    if len(paragraph) >= 200:
                        yield paragraph
                if macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB") and rest:
                    words.append(_untroff(rest.replace('"', "")))
                continue
            line = _untroff(line)
            if line:
                words.append(line)
        paragraph = " ".join(words)
        if len(paragraph) >= 200:
            yield paragraph


def _docstrings_under(root: Path, held_out: bool, skip: tuple[str, ...] = ()) -> Iterator[str]:
    for path in sorted(root.rglob("*.py")):
        if skip and any(part in skip for part in path.relative_to(root).parts):
            continue
        if (int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 10 == 0) != held_out:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=250_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--features", type=int, default=24)
    parser.add_argument("--llm-features", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(".cache/sae-smollm2"))
    parser.add_argument("--collect-only", action="store_true", help="collect (or resume) the store, then stop")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="no collection: train (or resume training) on the store's complete shards as they are, even while "
        "another process is still collecting into it, then evaluate and describe",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="no collection or training: evaluate and describe the SAE saved in --out (sae.safetensors), keeping "
        "the collection and training figures of its report.json",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import itertools

    import mechscope as ms
    from mechscope.features import (
        SAEConfig,
        SAETrainConfig,
        collect_activations,
        collect_store,
        load_sae,
        train_sae,
    )
    from mechscope.features.autointerp import (
        ChatExplainer,
        ChatJudge,
        TransformersChat,
        annotate_cards,
        describe_features,
    )
    from mechscope.features.cards import feature_cards
    from mechscope.features.dashboard import write_dashboard
    from mechscope.features.evals import downstream_loss, reconstruction_metrics
    from mechscope.features.quality import feature_density
    from mechscope.features.store import ActivationStore, token_rows

    hm = ms.load_model("smollm2-135m-instruct")
    report: dict = {"site": SITE, "threads": args.threads}
    start = time.perf_counter()
    if args.eval_only:
        kept = json.loads((args.out / "report.json").read_text())
        evaluated = ("held_out", "downstream", "descriptions")
        report |= {k: v for k, v in kept.items() if k not in evaluated and not k.endswith("records")}
        store = ActivationStore(args.out / "store")
    elif args.train_only:
        store = ActivationStore(args.out / "store")
        store.check(hm, SITE)
    else:
        store = collect_store(
            hm, SITE, corpus(False), args.out / "store", dtype="bf16", seq_len=128, max_tokens=args.tokens,
            batch_size=16, progress=True,
        )  # fmt: skip
        report["collect_seconds_this_run"] = time.perf_counter() - start
    report["tokens"] = store.n_tokens
    report["store_complete"] = store.complete
    report["store_bytes"] = store.manifest.bytes
    report["bytes_per_token"] = store.manifest.bytes / store.n_tokens
    print(json.dumps(report), flush=True)
    if args.collect_only:
        return

    if args.eval_only:
        sae = load_sae(args.out / "sae.safetensors")
    else:
        config = SAEConfig(d_in=hm.dims.d_model, d_sae=args.d_sae, activation="batchtopk", k=args.k, site=SITE)
        train = SAETrainConfig(steps=args.steps, batch_size=args.batch, lr=2e-3, checkpoint_every=50, log_every=25)
        start = time.perf_counter()
        sae, log = train_sae(store, config, train, checkpoint=args.out / "train.ckpt", progress=True)
        report["train_seconds_this_run"] = time.perf_counter() - start
        report["train_tokens"] = args.steps * args.batch
        report["train_log_last"] = log[-1]
        sae.model_info = store.manifest.model
        sae.save(args.out / "sae.safetensors")

    held = list(itertools.islice(docstrings(True), 400))
    x = collect_activations(hm, SITE, held, seq_len=128, max_tokens=20_000)
    report["held_out"] = reconstruction_metrics(sae, x)
    density = feature_density(sae, x)
    report["held_out"].update(dead_fraction=density["dead_fraction"], dense_fraction=density["dense_fraction"])
    report["downstream"] = downstream_loss(hm, sae, held, seq_len=128, max_rows=24, batch_size=8)
    print(json.dumps(report), flush=True)

    # The sample: features that fire in the rows the descriptions read (the first 96 held-out rows are the
    # first 96 x 127 tokens of `x`: collect_activations skips each row's first token).
    rows = token_rows(hm, held, 128)[:96]
    freq = torch.tensor(feature_density(sae, x[: rows.shape[0] * 127])["frequencies"])
    alive = (freq > 0).nonzero().squeeze(-1)
    chosen = alive[torch.randperm(alive.numel(), generator=torch.Generator().manual_seed(0))[: args.features]].tolist()
    baseline = describe_features(hm, sae, rows, chosen, causal_rows=8)
    llm = describe_features(
        hm, sae, rows, chosen[: args.llm_features], explainer=ChatExplainer(TransformersChat(hm, max_new_tokens=48)),
        judge=ChatJudge(TransformersChat(hm, max_new_tokens=2)), causal_rows=8,
    )  # fmt: skip

    def summary(records: list[dict]) -> dict:
        def med(key: str) -> float | None:
            vals = [r[key] for r in records if r[key] == r[key]]
            return statistics.median(vals) if vals else None

        return {k: med(k) for k in ("detection", "causal", "causal_control")} | {"n": len(records)}

    report["descriptions"] = {"baseline": summary(baseline), "smollm2": summary(llm)}
    report["baseline_records"] = baseline
    report["smollm2_records"] = llm
    cards = annotate_cards(feature_cards(hm, sae, held, chosen, seq_len=128, max_rows=96), baseline)
    write_dashboard(cards, args.out / "dashboard.html", title=f"SmolLM2-135M-Instruct {SITE} BatchTopK SAE")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("records")}, indent=1))
    print(f"dashboard -> {args.out / 'dashboard.html'}", file=sys.stderr)


if __name__ == "__main__":
    main()
