#!/bin/bash
# The shipped-model comparison groups, at 64x64 on the Twemoji set (128x128 on Noto's, below): 2x2 and 4x4
# patch models and the 1x1 baseline, same width, same budget (STEPS x 16 images). Rerunning resumes each run from its checkpoint,
# so the budget can be spread over several sessions. One torch thread per run, runs side by side.
#   PREDICTION=x0 LEVERS="--global-context 4" STEPS=20000 RUNS="g2 g1" benchmarks/train_models.sh
#   STEPS=2592 RUNS=g4 benchmarks/train_models.sh   # the 4x4 model, at the budget of the 2592-step snapshots
#   DATA=emoji-faces OUT=runs/faces64 STEPS=6000 benchmarks/train_models.sh   # the faces pair (halo 0, v0.1's default)
#   DATA=emoji-faces OUT=runs/faces64h8 STEPS=6000 RUNS=g2 LEVERS="--global-context 4 --halo 8" \
#     benchmarks/train_models.sh   # the 2x2 faces model with an 8 px halo: P/4, the halo that met the seam
#                                    target in results/halo.md's 32x32 group
#   DATA=noto-emoji-faces SIZE=128 OUT=runs/noto128 STEPS=6000 EVERY=1500 RUNS="g4 g1" \
#     LEVERS="--global-context 4 --halo 8 --patches-per-image 4" benchmarks/train_models.sh
#                                  # the 128x128 pair: 4x4 with the halo recipe, 4 of its 16 patches per image
#                                  # per step (the 64x64 2x2 model's cost per step), and its 1x1 baseline;
#                                  # previews (16 samples x 50 DDIM steps, the GCC probe) are slow at 128x128
#                                  # on one thread, so one every 1500 steps
#   DATA=noto-emoji-faces SIZE=128 OUT=runs/noto128 STEPS=10793 EVERY=1500 RUNS=g4 benchmarks/train_models.sh
#                                  # then the shipped noto128_4x4: the 4x4 ran on beside the 1x1 and stopped when
#                                  # the 1x1 reached 6000 steps (equal wall time, 10793 steps); resume is exact
# The 1x1 baseline shares the prediction type and TRAIN_ARGS; LEVERS (GCC-based) apply to the patch
# models only.
cd "$(dirname "$0")/.."  # the repository root
OUT=${OUT:-runs/emoji64}  # keep it outside the checkout to survive a fresh work tree
T=${PATCHGEN_TRAIN:-patchgen-train}
STEPS=${STEPS:-20000}
DATA=${DATA:-emoji}  # emoji: all 4009 Twemoji; emoji-faces: its 125 smileys; noto-emoji-faces: 120 at 128x128
SIZE=${SIZE:-64}  # image side
PREDICTION=${PREDICTION:-x0}
LEVERS=${LEVERS:-"--global-context 4"}
TRAIN_ARGS=${TRAIN_ARGS:-"--lr 5e-4"}
EVERY=${EVERY:-500}  # steps between previews
RUN_ARGS=${RUN_ARGS-"--bf16"}  # how this session computes: 1.66x on AVX512-BF16; RUN_ARGS= for fp32
run() {
  name=$1; shift
  if [ -f $OUT/$name/checkpoint.pt ]; then
    $T --out $OUT/$name --resume --max-steps $STEPS --preview-every $EVERY --checkpoint-every 250 --threads 1 $RUN_ARGS
  else
    $T --data $DATA --image-size $SIZE --max-steps $STEPS --batch-size 16 --preview-every $EVERY --checkpoint-every 250 \
       --threads 1 $RUN_ARGS --out $OUT/$name $TRAIN_ARGS "$@"
  fi
}
mkdir -p $OUT
for r in ${RUNS:-g2 g1}; do
  case $r in
    g1) run g1 --grid 1 --no-gcc --no-position --prediction $PREDICTION > $OUT/g1.log 2>&1 & ;;
    g2) run g2 --grid 2 --prediction $PREDICTION $LEVERS > $OUT/g2.log 2>&1 & ;;
    g4) run g4 --grid 4 --prediction $PREDICTION $LEVERS > $OUT/g4.log 2>&1 & ;;
  esac
done
wait
