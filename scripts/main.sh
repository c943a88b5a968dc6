#!/usr/bin/env bash
# The main job: install, then train the embedded default (MNIST-1D ResNet-1D, combined unit + layer
# pruning) end to end; the report lands in runs/default/report.md.  A run already in runs/default is
# started over (--overwrite); to continue an interrupted one instead:
#   .venv/bin/python -m pruning train --out runs/default --resume
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pruning train --config experiments/configs/default.toml --out runs/default --overwrite "$@"
