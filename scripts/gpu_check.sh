#!/usr/bin/env bash
# GPU readiness check: run from the repository root on a CUDA machine, as is, e.g. through the device tool:
#     bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
# It (1) reports the machine and the packages, (2) runs the scale tests on CUDA -- half-precision
# conformance (bf16/fp16 vs fp32, stated tolerances), device_map with GPU + CPU + disk offload, the 2-rank
# gloo job -- plus the model-core tests, (3) runs one nccl rank of the data-parallel sweep job and of the
# features job (collection, SAE training on the GPU interrupted at step 10 and resumed), and
# (4) runs bench_hooks, bench_patching, bench_path_patching and bench_sae on the GPU, each against its own
# baseline measured in the same run, then (5) prints forward, caching, head patching, AtP and SAE steps on
# CPU vs CUDA in fp32 and bf16, with ratios against the CPU fp32 baseline of the same run.
# Budget: a few minutes on one H100.
#
# No network is needed: it uses the machine's python3 (torch, transformers, accelerate, safetensors,
# jaxtyping, typer, tqdm, numpy are in the device image) with src/ on PYTHONPATH. Packages missing there
# can travel as wheels in .whl/ (see /work/.library/device/README.md); they are installed first if present.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash scripts/gpu_check.sh: a dry run of the same steps on CPU
export MECHSCOPE_TEST_DEVICE=${GPU_CHECK_DEVICE:-cuda}
status=0
work=$(mktemp -d)
# Each section's header says when it started (seconds since the script began), and the last line the total,
# so one run shows where the time goes against issue 19's budget (8 minutes on one H100, machine start included).
SECONDS=0
section() { echo "== [${SECONDS} s] $*"; }

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYEOF' || exit 1
import importlib, os, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
missing = []
for name in ("transformers", "accelerate", "safetensors", "jaxtyping", "typer", "tqdm", "numpy", "tokenizers", "pytest"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except ImportError:
        missing.append(name)
for name in ("bottle", "plotly"):  # viewer / plots only: not needed by this check
    try:
        importlib.import_module(name)
    except ImportError:
        print(f"  ({name} missing: viewer/plot tests are not run here)")
need_cuda = os.environ["MECHSCOPE_TEST_DEVICE"].startswith("cuda")
if missing or (need_cuda and not torch.cuda.is_available()):
    sys.exit(f"cannot run the GPU check: missing {missing or 'nothing'}, CUDA available: {torch.cuda.is_available()}")
PYEOF

section "scale tests on $MECHSCOPE_TEST_DEVICE (dtype conformance, device_map/offload, 2-rank gloo job)"
"$PY" -m pytest tests/scale -q -p no:cacheprovider -s -o addopts="" >"$work/scale.log" 2>&1 || status=1
tail -1 "$work/scale.log"
grep -E "^(FAILED|ERROR)" "$work/scale.log"
"$PY" - "$work/scale.log" <<'PYEOF'
import re, sys
worst = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"\[(bf16|fp16)\]: ([\d.]+) u \(tolerance (\d+) u, (\w+)\)", line)
    if m:
        key = (m.group(4), m.group(1), int(m.group(3)))
        worst[key] = max(worst.get(key, 0.0), float(m.group(2)))
print("largest error per check, in units of the dtype's roundoff u (tolerance):")
for (check, dtype, tol), err in sorted(worst.items()):
    print(f"  {check:15} {dtype}: {err:5.2f} u  (<= {tol} u)")
PYEOF

section "model-core tests (CPU models; checks this image's transformers against the adapters)"
"$PY" -m pytest tests/test_conformance.py tests/test_hooks.py tests/test_model_core.py -q -p no:cacheprovider \
    -o addopts="" 2>&1 | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

section "one rank of the data-parallel job on $MECHSCOPE_TEST_DEVICE (nccl on a GPU)"
"$PY" - "$work/model" <<'PYEOF'
import sys
from tiny_models import tiny_model
hf, tok = tiny_model("llama")
hf.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
PYEOF
mkdir -p "$work/out"
PYTHONPATH=$PWD/tests/scale:$PYTHONPATH timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    tests/scale/dist_job.py "$work/model" "$work/out" >"$work/log" 2>&1 \
    && echo "job: ok ($(ls "$work/out" | wc -l) outputs)" || { echo "job failed:"; tail -20 "$work/log"; status=1; }

section "the data-parallel features job on one rank, on $MECHSCOPE_TEST_DEVICE (collection, SAE training on the GPU, resume)"
mkdir -p "$work/fout"
PYTHONPATH=$PWD/tests/scale:$PYTHONPATH MECHSCOPE_TEST_STOP_AT=10 timeout 300 "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node 1 tests/scale/dist_features_job.py "$work/model" "$work/fout" >"$work/flog" 2>&1 \
    && echo "features job: ok ($(ls "$work/fout" | wc -l) outputs)" || { echo "features job failed:"; tail -20 "$work/flog"; status=1; }

section "benchmarks on $MECHSCOPE_TEST_DEVICE, each against its baseline in the same run"
dev=$MECHSCOPE_TEST_DEVICE
"$PY" benchmarks/bench_hooks.py --device "$dev" || status=1
"$PY" benchmarks/bench_hooks.py --device "$dev" --dtype float16 --rounds 5 || status=1  # the float16 guard's cost
"$PY" benchmarks/bench_patching.py --device "$dev" || status=1
"$PY" benchmarks/bench_patching.py --device "$dev" --layers 4 --d-model 256 --heads 8 --batch 4 || status=1
"$PY" benchmarks/bench_path_patching.py --device "$dev" || status=1
"$PY" benchmarks/bench_sae.py --device "$dev" --steps 50 || status=1

# Last, so that a run cut short still has the figures above. At GPT-2 size the CPU side runs fp32 only at
# batch 4: its patching sweep is ~55 forwards, and CPU bf16 would add minutes for a figure the small run gives.
section "figures (bench_devices: CPU vs CUDA, fp32 and bf16)"
"$PY" benchmarks/bench_devices.py --threads "${GPU_CHECK_THREADS:-8}" || status=1
[ -n "${GPU_CHECK_QUICK:-}" ] || "$PY" benchmarks/bench_devices.py --threads "${GPU_CHECK_THREADS:-8}" --layers 12 \
    --d-model 768 --heads 12 --vocab 50257 --batch 4 --pos 128 --repeats 2 --cpu-dtypes fp32 || status=1

echo "== gpu_check done: $([ $status -eq 0 ] && echo PASS || echo FAIL) in ${SECONDS} s (budget 480 s, start-up included)"
exit $status
