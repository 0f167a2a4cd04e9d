#!/usr/bin/env bash
# One device session on a lent GPU machine (no internet there; its image has JAX/flax/optax/orbax/
# torch; ml_collections and tensorboardX travel as wheels in .whl/). Runs the steps named in
# $STEPS (default "modulation,head,sampler"), each under a deadline:
#   modulation: the modulation-overhead benchmark of issue 2 on the accelerator (bare, with the
#               LM head, and in a whole train-step update; device time per call via --chain);
#   head:       the LM head's hand-written gradient against autodiff (benchmarks/bench_head.py):
#               the custom VJP was tuned on XLA:CPU, this checks it is not slower on the GPU;
#   sweep:      more seeds ($SWEEP_SEEDS) of the ablation sweep of issue 6 on the GPU, after a
#               3-step smoke run; if JAX's GPU path fails, the sweep runs on the CPU cores instead
#               (seeds 3-5 were run on 2026-11-27: docs/RESULTS.md);
#   trainstep:  the RL step benchmark (benchmarks/bench_train_step.py, embedded workload): per-phase
#               times and the count of compilations over changing allocations (target 0);
#   sampler:    our sampler's throughput on the GPU (no PyTorch baseline there) if time is left.
# Results land in $OUT (sweep metrics as a tarball). Usage on the device:
#   bash benchmarks/gpu_session.sh                 # or STEPS=sweep bash benchmarks/gpu_session.sh
set -u
START=$(date +%s)
BUDGET=${BUDGET:-540}   # seconds for the whole script
left() { echo $((BUDGET - ($(date +%s) - START))); }
OUT=${OUT:-/tmp/out}
STEPS=",${STEPS:-modulation,head,sampler},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi -L
  nproc
  python3 -c "import jax, flax, optax, orbax.checkpoint as o, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

if want modulation; then
  echo "== modulation benchmark ($(left)s left)"
  timeout 200 python3 benchmarks/bench_modulation.py --rows 4096 --tokens 1024 --repeats 20 \
    --chain 50 --profile --head --step 2>&1 | tee "$OUT/modulation_gpu.txt"
fi
if want head; then
  echo "== LM-head gradient benchmark ($(left)s left)"
  timeout 150 python3 benchmarks/bench_head.py --repeats 10 --chain 5 \
    --shapes peer,qwen0.5b,qwen0.5b_8k 2>&1 | tee "$OUT/head_gpu.txt"
fi

if want trainstep; then
  echo "== train-step benchmark ($(left)s left)"
  timeout 150 python3 benchmarks/bench_train_step.py --workloads embedded --steps 30 \
    --no-xla-cost 2>&1 | tee "$OUT/train_step_gpu.txt"
fi

if want sweep; then
  SWEEP=/tmp/sweep
  SEEDS=${SWEEP_SEEDS:-3,4,5}
  # A warm start made elsewhere (runs/ablations/_sft copied to sweep_sft/) saves its minutes here.
  for d in $SWEEP /tmp/smoke; do
    mkdir -p $d && [ -d sweep_sft ] && cp -r sweep_sft $d/_sft
  done
  echo "== sweep smoke ($(left)s left)"
  BACKEND=gpu
  if ! timeout 240 python3 -m experiments.ablations --out /tmp/smoke --variants dynamo --seeds 0 \
      --steps 3 --jobs 1 --no_single_thread --set eval.num_prompts=16 > "$OUT/smoke.txt" 2>&1; then
    BACKEND=cpu
    tail -40 /tmp/smoke/dynamo/seed0/log.txt /tmp/smoke/_sft/log.txt >> "$OUT/smoke.txt" 2>/dev/null
  fi
  echo "backend for the sweep: $BACKEND" | tee -a "$OUT/smoke.txt"
  tail -5 "$OUT/smoke.txt"

  echo "== sweep ($(left)s left)"
  MINUTES=$(python3 -c "print(max(($(left) - 90) / 60, 1))")
  if [ "$BACKEND" = gpu ]; then
    timeout $(( $(left) - 30 )) python3 -m experiments.ablations --out $SWEEP --seeds $SEEDS \
      --jobs 21 --no_single_thread --max_minutes "$MINUTES" 2>&1 | tail -30 | tee "$OUT/sweep.txt"
  else
    JAX_PLATFORMS=cpu timeout $(( $(left) - 30 )) python3 -m experiments.ablations --out $SWEEP \
      --seeds $SEEDS --steps 150 --jobs 16 --max_minutes "$MINUTES" 2>&1 | tail -30 \
      | tee "$OUT/sweep.txt"
  fi
  tar czf "$OUT/sweep.tgz" -C $SWEEP --exclude='checkpoints' --exclude='sft_model' . 2>/dev/null
fi

if want sampler && [ "$(left)" -gt 150 ]; then
  echo "== sampler benchmark ($(left)s left)"
  timeout $(( $(left) - 20 )) python3 benchmarks/bench_sampling.py --models qwen0.5b \
    --batches 64,256 --new-tokens 128 --repeats 1 --no-torch 2>&1 | tail -30 | tee "$OUT/sampling_gpu.txt"
fi
echo "done after $(( $(date +%s) - START ))s"
