#!/bin/bash
# The shipped 128x128 models' recipe on one GPU, in one command that fits a 10-minute call (the device tool's
# limit per command; its 15 minutes in all leave time for the machine's start and a rerun):
#   the 4x4 model (halo 8, global context 4, 4 of 16 patches per image per step, x0 prediction) and its 1x1
#   baseline, batch 16, lr 5e-4, side by side on the one GPU, bf16 autocast, previews every 1500 steps.
# Each run stops at STEPS or after MINUTES, whichever comes first; a stop by time is SIGTERM, which
# checkpoints. The full checkpoints (with optimizer state, 27 MB each) stay on the GPU machine; what comes
# back is a slim copy for patchgen-export, which cannot be resumed.
#
#   benchmarks/train_gpu.sh                        # on the GPU machine: runs land in $OUT (or runs/gpu)
#   DEVICE=cpu STEPS=3 MINUTES=2 SIZE=32 benchmarks/train_gpu.sh   # its dry run on a CPU
#   DEVICE=cpu STEPS=2 SIZE=16 HALO=2 TRAIN_ARGS="--base-width 8 --num-res-blocks 1" benchmarks/train_gpu.sh
#                                                  # a smoke run: a tiny model in both runs, seconds
#
# What it needs there: torch with CUDA, numpy, pillow, click and fontTools (the device image has them), and
# the Noto Color Emoji font: copy /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf into .gpu/ in the
# checkout (ignored by git) and carry .gpu. patchgen itself runs from the checkout, not installed.
# What comes back: per run, the checkpoint without its optimizer state (export.pt: config, weights, EMA
# weights; patchgen-export reads it; under the tool's 16 MiB per file), its logs and its last preview: 8 files,
# the tool's limit, for two runs.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-6000}
MINUTES=${MINUTES:-7}
SIZE=${SIZE:-128}
RESULT=${OUT:-runs/gpu}  # the device tool's $OUT comes back to the caller
RUNS=${RUNS:-"g4 g1"}
HALO=${HALO:-$((SIZE / 16))}  # 8 at 128: P/4
EVERY=${EVERY:-1500}  # steps between previews (0: none)
export PATCHGEN_NOTO_FONT=${PATCHGEN_NOTO_FONT:-$PWD/.gpu/NotoColorEmoji.ttf}
export PATCHGEN_CACHE_DIR=${PATCHGEN_CACHE_DIR:-/tmp/patchgen-cache}
# patchgen from this checkout, without installing it: a namespace package of the four top-level folders
SHIM=$(mktemp -d)
WORK=$(mktemp -d)
trap 'rm -rf "$SHIM" "$WORK"' EXIT
mkdir -p $SHIM/patchgen
for d in runtime models export cli; do ln -s "$PWD/$d" $SHIM/patchgen/$d; done
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
BF16=${BF16---bf16}
TRAIN_ARGS=${TRAIN_ARGS:-}  # more patchgen-train options for both runs (a smoke run's tiny model)
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
mkdir -p "$RESULT"
train() {
  name=$1; shift
  # SIGTERM after MINUTES: patchgen-train finishes its step, checkpoints and exits 143
  timeout -s TERM -k 90 $((MINUTES * 60)) $PY -m patchgen.cli.train --data noto-emoji-faces --image-size $SIZE \
    --batch-size 16 --lr 5e-4 --prediction x0 --max-steps $STEPS --preview-every $EVERY --checkpoint-every 500 \
    --device $DEVICE $BF16 $TRAIN_ARGS --out $WORK/$name "$@" > $WORK/$name.log 2>&1 || echo "$name: exit $?" >> $WORK/$name.log
}
# the image cache, once, before the two runs map it
$PY -c "from patchgen.models.data import load_data; from patchgen.models.decoding import Decoding
import os; load_data('noto-emoji-faces', $SIZE, decoding=Decoding(os.environ['PATCHGEN_CACHE_DIR'], 4))"
for r in $RUNS; do
  case $r in
    g4) train g4 --grid 4 --global-context 4 --halo $HALO --patches-per-image 4 & ;;
    g1) train g1 --grid 1 --no-gcc --no-position & ;;
  esac
done
wait
for r in $RUNS; do
  tail -c 600 $WORK/$r.log; echo
  $PY - "$WORK/$r" "$RESULT" "$r" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
run, result, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
ckpt.pop("optimizer")
torch.save(ckpt, result / f"{name}_export.pt")
for f in ["train_log.csv", "eval_log.csv", *[p.name for p in sorted(run.glob("preview_*.png"))[-1:]]]:
    if (run / f).exists():
        shutil.copy(run / f, result / f"{name}_{f}")
print(f"{name}: step {ckpt['step']}, {(result / f'{name}_export.pt').stat().st_size / 2**20:.1f} MiB")
EOF
done
