#!/usr/bin/env bash
# Every GPU-dependent check in one command (about 8 minutes on one GPU): the GPU tests against the CPU,
# then the 8B-shaped static analysis's wall time. Run from the repository root after `make setup`.
set -euo pipefail
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))"
$PY -m pytest -q tests/test_gpu.py tests/test_operator_fit_streamed.py tests/test_entropy.py -x
timeout 300 $PY benchmarks/bench_scale.py --shapes llama3-8b
