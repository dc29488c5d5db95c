#!/usr/bin/env bash
# The pool benchmark on a GPU machine (run from the repo root, e.g. through the device tool):
# the same batched-vs-single measurement on CUDA with larger batches, and peak GPU memory.
set -euo pipefail
python3 -m venv /tmp/dg-gpu && /tmp/dg-gpu/bin/pip install -q -e . 2>&1 | tail -2
/tmp/dg-gpu/bin/python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
/tmp/dg-gpu/bin/python bench/pool/bench_pool.py --device cuda:0 --batch 128 --threads 4
