#!/bin/bash
# The halo study (benchmarks/results/halo.md): on the Twemoji faces, the shipped recipe (x0-prediction, global
# vector 4, lr 5e-4, bf16) at one budget per group, the same width everywhere; only the halo changes.
#   group 1, 32x32 in 2x2 patches of 16 (STEPS1 x 16 images): halo 0, 2, 4, 4 with the edge mask, and 1x1
#   (halo 8 only with HALO8=1: the issue asked for it if 4 fell short, and 4 did not)
#   group 2, 64x64 in 4x4 patches of 16 (STEPS2 x 8 images): halo 0, HALO2, and 1x1
# Two queues, one torch thread each. Rerunning resumes unfinished runs from their checkpoints.
# Then: python benchmarks/halo.py --runs $OUT
#   benchmarks/train_halo.sh                         # both groups, runs/halo/<group>/<run>
#   STUDY=g1 benchmarks/train_halo.sh                # group 1 only
#   OUT=/tmp/halo STEPS1=2 STEPS2=2 EVERY=1 benchmarks/train_halo.sh   # a smoke run
cd "$(dirname "$0")/.."  # the repository root
OUT=${OUT:-runs/halo}
LOGS=${LOGS:-$OUT}  # the two queues' logs, queue_a.log and queue_b.log
T=${PATCHGEN_TRAIN:-patchgen-train}
STEPS1=${STEPS1:-1500}
STEPS2=${STEPS2:-1500}
HALO2=${HALO2:-4}  # group 2's halo: the best of group 1
EVERY=${EVERY:-750}  # steps between previews (each logs the seam score)
RUN_ARGS=${RUN_ARGS-"--bf16"}  # how this session computes; RUN_ARGS= for fp32
RECIPE="--data emoji-faces --prediction x0 --lr 5e-4"
if ! command -v ${T%% *} > /dev/null; then
  echo "train_halo.sh: ${T%% *} not found; install patchgen with the train extra or set PATCHGEN_TRAIN" >&2
  exit 1
fi
run() {  # run <folder> <steps> <new-run arguments...>
  dir=$1; steps=$2; shift 2
  if [ -f "$dir/checkpoint.pt" ]; then
    $T --out "$dir" --resume --max-steps $steps --threads 1 $RUN_ARGS
  else
    $T $RECIPE --max-steps $steps --preview-every $EVERY --checkpoint-every 250 --threads 1 $RUN_ARGS \
       --out "$dir" "$@"
  fi
}
g1() { run "$OUT/g1/$1" $STEPS1 --image-size 32 --batch-size 16 "${@:2}"; }
g2() { run "$OUT/g2/$1" $STEPS2 --image-size 64 --batch-size 8 "${@:2}"; }
PATCH="--global-context 4"
queue_a() {
  case " ${STUDY:-g1 g2} " in *" g1 "*)
    g1 halo0 --grid 2 $PATCH
    g1 full --grid 1 --no-gcc --no-position
    g1 halo2 --grid 2 $PATCH --halo 2
    if [ -n "$HALO8" ]; then g1 halo8 --grid 2 $PATCH --halo 8; fi ;;
  esac
  case " ${STUDY:-g1 g2} " in *" g2 "*)
    g2 halo0 --grid 4 $PATCH
    g2 full --grid 1 --no-gcc --no-position ;;
  esac
}
queue_b() {
  case " ${STUDY:-g1 g2} " in *" g1 "*)
    g1 halo4 --grid 2 $PATCH --halo 4
    g1 halo4_mask --grid 2 $PATCH --halo 4 --edge-mask ;;
  esac
  case " ${STUDY:-g1 g2} " in *" g2 "*)
    g2 halo$HALO2 --grid 4 $PATCH --halo $HALO2 ;;
  esac
}
mkdir -p "$OUT/g1" "$OUT/g2" "$LOGS"
queue_a > "$LOGS/queue_a.log" 2>&1 &
queue_b > "$LOGS/queue_b.log" 2>&1 &
wait
