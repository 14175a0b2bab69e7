"""`mechscope eval run` wall time on an organism: this tree against an older commit, in the same run.

The baseline is the CLI of `--before` (default: the commit before issue 21's harness work), extracted with
`git archive` into a temporary folder and run with the same interpreter, alternating with this tree's CLI
`--repeats` times. Both evaluate the same steering vector (built once by this tree), and the script checks
that the two results hold the same metric values.

    flock /tmp/mechscope-heavy.lock .venv/bin/python benchmarks/bench_eval_run.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "from mechscope.cli.main import app; app()"


def _cli(src: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed under {src}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="24b77ee", help="baseline commit (default: %(default)s)")
    parser.add_argument("--model", default="organism-gpt2")
    parser.add_argument("--repeats", type=int, default=1)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-eval-") as tmp:
        work = Path(tmp)
        archive = subprocess.run(["git", "archive", opts.before, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
        before_src, after_src = work / "src", ROOT / "src"
        vector = work / "sentiment.safetensors"
        _cli(after_src, ["steer", "vector", opts.model, "--contrast", "sentiment", "--layers", "3", "-o", str(vector)])
        args = ["eval", "run", opts.model, "--task", "sentiment", "--vector", str(vector), "--coefficient", "0.7"]
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(opts.repeats):
            for name, src in (("before", before_src), ("after", after_src)):
                times[name].append(_cli(src, [*args, "-o", str(work / f"{name}-{r}.safetensors")]))
                print(f"{name:6s} run {r}: {times[name][-1]:.1f} s", flush=True)
        sys.path.insert(0, str(after_src))
        from mechscope.improve import EvaluationResult

        a = EvaluationResult.load(work / "before-0.safetensors")
        b = EvaluationResult.load(work / "after-0.safetensors")
        same = a.metrics == b.metrics and bool((a["values"] == b["values"]).all())
        worst = max(abs(a.after(m) - b.after(m)) for m in a.metrics if m in b.metrics)
        best_before, best_after = min(times["before"]), min(times["after"])
        print(f"\n| `eval run {opts.model} --task sentiment` | wall (s, best of {opts.repeats}) |")
        print("|---|---|")
        print(f"| before ({opts.before}) | {best_before:.1f} |")
        print(f"| after (this tree) | {best_after:.1f} |")
        print(f"| ratio before / after | {best_before / best_after:.2f}x |")
        print(f"identical metric values: {same} (largest difference {worst:.3g})")


if __name__ == "__main__":
    main()
