#!/bin/bash
# Lever and ablation runs at 32x32, 2x2 grid, one budget: STEPS x 16 images. Two queues, one thread each.
# Rerunning resumes unfinished runs from their checkpoints. Then: python benchmarks/levers.py $OUT/*
#   benchmarks/train_levers.sh                              # runs/levers/<run>, logs runs/levers_{a,b}.log
#   OUT=/tmp/levers STEPS=1 benchmarks/train_levers.sh      # a smoke run
#   PATCHGEN_TRAIN="python -m patchgen.cli.train" benchmarks/train_levers.sh
cd "$(dirname "$0")/.."  # the repository root
OUT=${OUT:-runs/levers}  # one folder per run, nothing else: levers.py reads every folder in it
LOGS=${LOGS:-$(dirname "$OUT")}  # the two queues' logs, levers_a.log and levers_b.log
T=${PATCHGEN_TRAIN:-patchgen-train}
STEPS=${STEPS:-1500}
if ! command -v ${T%% *} > /dev/null; then
  echo "train_levers.sh: ${T%% *} not found; install patchgen with the train extra or set PATCHGEN_TRAIN" >&2
  exit 1
fi
run() {
  name=$1; shift
  if [ -f "$OUT/$name/checkpoint.pt" ]; then
    $T --out "$OUT/$name" --resume --max-steps $STEPS --preview-every 500 --checkpoint-every 250 --threads 1
  else
    $T --data emoji --image-size 32 --grid 2 --max-steps $STEPS --batch-size 16 --preview-every 500 \
       --checkpoint-every 250 --threads 1 --out "$OUT/$name" "$@"
  fi
}
queue_a() {
  run paper_eps
  run x0 --prediction x0
  run v_global --prediction v --global-context 4
  run x0_global_selfcond --prediction x0 --global-context 4 --gcc-source x0
}
queue_b() {
  run no_gcc --no-gcc
  run no_position --no-position
  run neither --no-gcc --no-position
  run x0_global --prediction x0 --global-context 4
}
mkdir -p "$OUT" "$LOGS"
queue_a > "$LOGS/levers_a.log" 2>&1 &
queue_b > "$LOGS/levers_b.log" 2>&1 &
wait
