#!/usr/bin/env bash
# Install, then evaluate SmolLM2-135M-Instruct on MAWPS test problems, fine-tune it with a
# MoSLoRA adapter on a MAWPS training subset, evaluate it again and print both accuracies.
# Extra arguments go to `moslora quickstart` (see `moslora quickstart --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MOSLORA_DATA=${MOSLORA_DATA:-$(cd .. && pwd)/shared/data}
moslora quickstart "$@"
