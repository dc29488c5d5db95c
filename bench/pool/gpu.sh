#!/usr/bin/env bash
# The pool benchmark on a GPU machine, run from the repo root: the same batched-vs-single
# measurement on CUDA with larger batches (bfloat16 and float32), and peak GPU memory.
# Uses the project's .venv (carry it to the machine, or set PYTHON to an interpreter with the
# project installed); the machine needs no network.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PYTHON" bench/pool/bench_pool.py --device cuda:0 --batch 128 --threads 4 --dtype bfloat16
"$PYTHON" bench/pool/bench_pool.py --device cuda:0 --batch 128 --threads 4 --dtype float32
