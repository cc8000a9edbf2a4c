#!/usr/bin/env bash
# On a CUDA machine: the test suite's CUDA cases, then the GPU benchmark table (written to RESULTS.md's GPU
# section). About 8 minutes on one H100. Run from the project root: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'"
timeout 240 python -m pytest -q -m cuda tests/test_cuda.py
cd benchmarks
timeout 420 python -W ignore gpu.py --rounds 10 --write-results
