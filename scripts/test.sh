#!/usr/bin/env bash
# Install, then run the linters and the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MOSLORA_DATA=${MOSLORA_DATA:-$(cd .. && pwd)/shared/data}
ruff check .
ruff format --check .
python -m pytest "$@"
