#!/usr/bin/env bash
# Runs the benchmark suite on a GPU machine: the named steps in order, each logged, from the repository root.
#
#   benchmarks/gpu_suite.sh OUT_DIR STEP...
#   e.g. GPUS=2 BUDGET_MIN=10 TASKS='' benchmarks/gpu_suite.sh /tmp/suite numerics gputests trained kernels e2e
#
# Steps:
#   numerics          graph_numerics.py --check: the captured graph equals the model under bf16 autocast; if not,
#                     the suite stops there (trained runs would train a wrong function). Run it first.
#   gputests          nested_region_check.py and the tests marked gpu
#   oneshot           accuracy.py: dense, magnitude, Wanda, SparseGPT, with PIQA and ARC-Easy
#   trained           accuracy.py: TRAINED (default: SparseForge and the peer) at BUDGET_MIN minutes (default 8)
#   trained2          accuracy.py: a second method list, TRAINED2, into its own results file
#   sweep             accuracy.py: SWEEP methods at SWEEP_STEPS steps (default 800) on SWEEP_ROWS teacher rows
#                     (default 4096), scored on WikiText-2 valid: recipe tuning, not reporting
#   trained_best      the sweep's best SparseForge and best peer method (lowest valid ppl) at the full budget,
#                     with BEST_AGAINST (a method list, optional) beside them
#   step_time         step_time.py: annealing vs plain KD steps, teacher sampling, torch.profiler tables
#   step_loop         step_time.py: layer-wise weights 0 and 3, the loop's own pace, host reports (~3.5 min)
#   step_interleaved  step_time.py --timing interleaved: the peer's step, plain KD with SparseForge's loss and
#                     SparseForge's soft and hard steps timed round by round (~4 min)
#   lowered           lowered_model.py on SmolLM2-135M
#   kernels           kernel_table.py
#   e2e               e2e.py
#   decode_kernels    decode_table.py: the 2:4 decode kernel against cuBLAS (and cuSPARSELt) at 1-64 tokens
#   e2e_compact       e2e.py --layout compact: every layer in the decode layout alone (0.5625x the dense bytes)
#   e2e_both          e2e.py --layout both: decode, cuSPARSELt and dense measured per bucket
#   fp8               fp8_table.py --accuracy: FP8 x 2:4 vs FP8 dense vs bf16 at >= 4096 tokens, SmolLM2 FP8 ppl
#   generate          generate.py: static-cache greedy tokens/s, dense vs lowered (cusparselt, compact)
#   throughput        train_throughput.py: training tokens/s of SparseForge and the peer, CUDA graphs and batch auto off and on,
#                     and data-parallel scaling over 1..GPUS GPUs (default 1)
#
# Settings: TASKS (zero-shot tasks of the trained steps; default piqa,arc_easy, empty for none), STEP_BATCHES
# (step_time's batch sizes), STEP_ROUNDS (step_interleaved), GPUS=N (default 1: the trained and sweep steps run
# their methods N at a time, one process and one GPU each, accuracy.py --gpus).
# OUT_DIR/suite.log says which step ran, for how long, and its exit status; each step's output is OUT_DIR/STEP.log
# and its results file lands in OUT_DIR. OUT_DIR/pgid holds the suite's process group: start the suite with
# setsid to stop it, and whatever step it runs, with `kill -- -$(cat OUT_DIR/pgid)`.
set -u
out=$1
shift
mkdir -p "$out"
ps -o pgid= $$ | tr -d ' ' > "$out/pgid"
budget=${BUDGET_MIN:-8}
trained=${TRAINED:-sparseforge,sparsegpt+kd}
tasks=${TASKS-piqa,arc_easy}
gpus=${GPUS:-1}
for step in "$@"; do
  case $step in
    numerics) cmd=(python -m benchmarks.graph_numerics --batch 4 --seqlen 512 --check --out "$out/graph_numerics.json") ;;
    gputests) cmd=(bash -c "python3 -m pytest -q -m gpu -p no:cacheprovider") ;;
    lowered) cmd=(python -m benchmarks.lowered_model --model smollm2-135m --out "$out/lowered_smollm2-135m.json") ;;
    trained) cmd=(python -m benchmarks.accuracy --methods "$trained" --budget-minutes "$budget"
                  --tasks "$tasks" --also-valid --gpus "$gpus" --quiet --out "$out/accuracy_smollm2-135m_trained.json") ;;
    trained2) cmd=(python -m benchmarks.accuracy --methods "${TRAINED2:?set TRAINED2}" --budget-minutes "$budget"
                   --tasks "$tasks" --also-valid --gpus "$gpus" --quiet --out "$out/accuracy_smollm2-135m_trained2.json") ;;
    oneshot) cmd=(python -m benchmarks.accuracy --methods dense,magnitude,wanda,sparsegpt
                  --tasks piqa,arc_easy --quiet --out "$out/accuracy_smollm2-135m_oneshot.json") ;;
    sweep) cmd=(python -m benchmarks.accuracy --methods "${SWEEP:-sparseforge,sparsegpt+kd}"
                --anneal "steps=${SWEEP_STEPS:-800}" --teacher-sample-rows "${SWEEP_ROWS:-4096}" --warm-compile-caches
                --split valid --tasks '' --gpus "$gpus" --quiet --out "$out/accuracy_smollm2-135m_sweep.json") ;;
    step_time) cmd=(python -m benchmarks.step_time --batch-sizes "${STEP_BATCHES:-32}" --hidden-weights 3 --compile on
                    --sample-batches 4096 --profile "$out/profile/step" --out "$out/step_time.json") ;;
    trained_best)  # the sweep's best SparseForge row and best peer row (valid), side by side at the full budget
      best=$(python3 -c "
import json, sys
rows = json.load(open(sys.argv[1]))['rows']
picks = [min(group, key=lambda r: r['wikitext2_ppl'])['method'] for group in
         ([r for r in rows if r['method'].startswith(p)] for p in ('sparseforge', 'sparsegpt+kd')) if group]
print(','.join(picks))" "$out/accuracy_smollm2-135m_sweep.json") && [ -n "$best" ] \
        || { echo "== trained_best: no sweep results" >> "$out/suite.log"; continue; }
      cmd=(python -m benchmarks.accuracy --methods "$best${BEST_AGAINST:+,$BEST_AGAINST}" --budget-minutes "$budget"
           --tasks "$tasks" --also-valid --gpus "$gpus" --quiet --out "$out/accuracy_smollm2-135m_trained_best.json") ;;
    step_loop)  # the GPU compile mode (regional), both layer-wise weights, loop pace and where the host waits
      cmd=(python -m benchmarks.step_time --batch-sizes "${STEP_BATCHES:-32}" --hidden-weights 0,3 --compile on
           --outline regional --repeats 10 --sample-batches ''
           --host-report "$out/host/step" --out "$out/step_time_regional_loop.json") ;;
    step_interleaved)  # the loops side by side, round by round, at the default layer-wise weight
      cmd=(python -m benchmarks.step_time --batch-sizes "${STEP_BATCHES:-32}" --hidden-weights 3 --compile on
           --timing interleaved --rounds "${STEP_ROUNDS:-7}" --sample-batches '' --out "$out/step_time_interleaved.json") ;;
    kernels) cmd=(python -m benchmarks.kernel_table --out "$out/kernels.json") ;;
    e2e) cmd=(python -m benchmarks.e2e --out "$out/e2e.json") ;;
    decode_kernels) cmd=(python -m benchmarks.decode_table --out "$out/decode_kernels.json") ;;
    e2e_compact) cmd=(python -m benchmarks.e2e --layout compact --paths lower,backend --out "$out/e2e_compact.json") ;;
    e2e_both) cmd=(python -m benchmarks.e2e --layout both --paths lower --out "$out/e2e_both.json") ;;
    fp8) cmd=(python -m benchmarks.fp8_table --accuracy --out "$out/fp8.json") ;;
    generate) cmd=(python -m benchmarks.generate --out "$out/generate.json") ;;
    throughput) cmd=(python -m benchmarks.train_throughput --gpus "$(seq -s, 1 "${GPUS:-1}")" --out "$out/train_throughput.json") ;;
    *) echo "unknown step $step" >> "$out/suite.log"; continue ;;
  esac
  echo "== $(date -u +%H:%M:%S) $step: ${cmd[*]}" >> "$out/suite.log"
  start=$(date +%s)
  "${cmd[@]}" > "$out/$step.log" 2>&1
  rc=$?
  echo "== $(date -u +%H:%M:%S) $step rc=$rc in $(( $(date +%s) - start ))s" >> "$out/suite.log"
  if [ "$step" = numerics ] && [ "$rc" != 0 ]; then  # the trained runs would train a wrong graph
    echo "== numerics failed: the captured graph is not the model under autocast; stopping" >> "$out/suite.log"
    break
  fi
done
echo "== done" >> "$out/suite.log"
