#!/bin/bash
# Lever and ablation runs at 32x32, 2x2 grid, one budget: 1500 steps x 16 images. Two queues, one thread each.
# Rerunning resumes unfinished runs from their checkpoints.
cd "$(dirname "$0")/.."  # the repository root; runs go to runs/levers/
T=/work/venv/bin/patchgen-train
STEPS=${STEPS:-1500}
run() {
  name=$1; shift
  if [ -f runs/levers/$name/checkpoint.pt ]; then
    $T --out runs/levers/$name --resume --max-steps $STEPS --preview-every 500 --checkpoint-every 250 --threads 1
  else
    $T --data emoji --image-size 32 --grid 2 --max-steps $STEPS --batch-size 16 --preview-every 500 \
       --checkpoint-every 250 --threads 1 --out runs/levers/$name "$@"
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
queue_a > runs/levers_a.log 2>&1 &
queue_b > runs/levers_b.log 2>&1 &
wait
