#!/usr/bin/env bash
# Create .venv in the repository (once) and install augsvhn with its test extras into it.
# PyTorch comes first at pinned versions so that pip does not pull another build; set AUGSVHN_TORCH_SPEC
# (for example "torch torchvision") to install other versions.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${AUGSVHN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install --quiet -e ".[test]"
