#!/usr/bin/env bash
# One short GPU session, prepared in advance (run through the device tool when a GPU is lent):
#   bash benchmarks/gpu_check.sh            -> prints markdown for BENCHMARKS.md
# Sets up a venv if needed, checks that CUDA works, times the networks at the paper's
# 128-px config, measures sec/kimg of paper128 training on phantoms, and the inversion speeds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] || { $PY -m venv .venv && .venv/bin/pip -q install -e '.[dev]'; }
B=.venv/bin
$B/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0), torch.__version__)"
$B/python benchmarks/bench_gan.py --device cuda --batch 32 --full --train-step --stat min
$B/python benchmarks/bench_inversion.py --device cuda --presets demo64,paper128 --steps 500 --batch 32
OUT=$(mktemp -d)
$B/cxredit phantoms --out "$OUT/store" --n 2000 --resolution 128 --workers 8 --no-progress
# 2 kimg of the paper's setting: the tqdm line and stats.jsonl give sec/kimg
$B/cxredit train-gan --data "$OUT/store" --out "$OUT/run" --preset paper128 --kimg 2 \
    --snap-kimg 2 --no-progress
tail -1 "$OUT/run/stats.jsonl"
