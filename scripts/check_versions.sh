#!/usr/bin/env bash
# Run the whole test suite against another stack of releases than ./run's venv, to back pyproject.toml's
# floors and to try a machine's stack before spending device time on it (docs/scale.md, "Versions").
#
#   scripts/check_versions.sh floors     Python 3.10 and the oldest releases pyproject.toml declares
#   scripts/check_versions.sh gpu-image  the device image's stack: Python 3.12, torch 2.11, transformers 5.17
#
# Each profile builds a venv under ${CHECK_VERSIONS_DIR:-/tmp/mechscope-versions}/PROFILE (once; PyPI's torch
# wheels are CUDA builds, a few GB, and run on the CPU), installs mechscope there without its dependencies, and
# runs `pytest tests`, or pytest with the arguments given. The interpreter comes from $PYTHON310 / $PYTHON312 (default:
# python3.10 / python3.12 on PATH). Not part of CI: the downloads alone outlast its budget.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-}"
shift || true
root="${CHECK_VERSIONS_DIR:-/tmp/mechscope-versions}"
case "$profile" in
  floors)
    python="${PYTHON310:-python3.10}"
    packages=(torch==2.6.0 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 jaxtyping==0.2.30
              typer==0.18.0 tqdm==4.66.6 bottle==0.13.5 plotly==5.20.0 numpy==1.26.4 gguf==0.10.0 pytest psutil) ;;
  gpu-image)
    python="${PYTHON312:-python3.12}"
    packages=(torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2
              huggingface_hub==1.33.0 numpy==2.5.2 jaxtyping typer tqdm bottle plotly gguf pytest psutil) ;;
  *)
    echo "usage: scripts/check_versions.sh floors|gpu-image [pytest args]" >&2
    exit 2 ;;
esac
venv="$root/$profile"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
  # PIP_CONSTRAINT is cleared: this machine's pip cap pins torch to the CPU build ./run uses.
  PIP_CONSTRAINT= "$venv/bin/python" -m pip install --quiet "${packages[@]}"
fi
"$venv/bin/python" -m pip install --quiet --no-deps -e .
"$venv/bin/python" -c "import sys, torch, transformers, accelerate; print(f'python {sys.version.split()[0]}, torch \
{torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}')"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
