#!/usr/bin/env bash
# One short GPU session, prepared in advance (run through the device tool when a GPU is lent):
#   bash benchmarks/gpu_check.sh            -> the numbers for BENCHMARKS.md, on stdout
# Times the networks at the paper's 128-px configs, one full training step, the inversion
# speeds, and sec/kimg of 2 kimg of paper128 training on phantoms.
#
# The lent machines have python3 with torch but cannot download anything, so this runs from
# the source tree (PYTHONPATH=src) with the machine's own python3 and no install. The one
# pure-Python dependency they lack, pytorch-msssim, travels as a wheel in .whl/ (git-ignored):
#   pip download --no-deps --only-binary=:all: -d .whl pytorch-msssim
# and the device call carries ".whl". A local .venv with a CUDA torch is used when present.
#
# Environment: DEVICE (default cuda), QUICK=1 for a seconds-long plumbing check of the whole
# script on any device (tiny sizes; its numbers mean nothing), OUT (default: a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PY:-python3}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys
sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=.venv/bin/python
fi
if ! $PY -c "import pytorch_msssim" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "pytorch-msssim missing and no .whl/ to install"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/cxredit_site .whl/*.whl
  export PYTHONPATH=/tmp/cxredit_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
$PY - "$DEVICE" <<'EOF'
import sys, torch, cxredit
dev = sys.argv[1]
if dev.startswith("cuda"):
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cxredit {cxredit.__version__}")
else:
    print(f"# {dev}, torch {torch.__version__}, cxredit {cxredit.__version__}")
EOF
OUT=${OUT:-$(mktemp -d)}
CX="$PY -m cxredit.cli"
if [ "$QUICK" = 1 ]; then
  $PY benchmarks/bench_gan.py --device "$DEVICE" --batch 8 --configs tiny --train-step \
      --warmup 1 --repeat 1
  $PY benchmarks/bench_inversion.py --device "$DEVICE" --presets tiny --steps 5 --batch 4
  $CX phantoms --out "$OUT/store" --n 64 --resolution 32 --no-progress
  $CX train-gan --data "$OUT/store" --out "$OUT/run" --preset tiny --kimg 0.032 --batch 8 \
      --snap-kimg 0.032 --no-progress --device "$DEVICE"
else
  $PY benchmarks/bench_gan.py --device "$DEVICE" --batch 32 --full --train-step --stat min
  $PY benchmarks/bench_inversion.py --device "$DEVICE" --presets demo64,paper128 --steps 500 \
      --batch 32
  $CX phantoms --out "$OUT/store" --n 2000 --resolution 128 --workers 8 --no-progress
  # 2 kimg of the paper's setting: stats.jsonl's sec_per_kimg (the first tick includes warm-up)
  $CX train-gan --data "$OUT/store" --out "$OUT/run" --preset paper128 --kimg 2 \
      --snap-kimg 2 --no-progress --device "$DEVICE"
fi
echo "# train-gan stats (sec_per_kimg per tick):"
cat "$OUT/run/stats.jsonl"
