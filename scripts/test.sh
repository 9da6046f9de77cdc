#!/usr/bin/env bash
# Install everything into .venv and run the test suite against the real SVHN subset.
# The subset is read from $AUGSVHN_TEST_SVHN_ROOT, by default ../shared/data/svhn beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
