#!/usr/bin/env bash
# Runs named measurement steps in order on the GPU machine, each logged, so one detached job can
# outlive the device tool's 10-minute call (see benchmarks/README.md, "Long sessions").
#
#   benchmarks/h200_session.sh OUT_DIR STEP...
#
# Steps: numerics gputests lowered trained trained2 trained_best oneshot step_time step_loop step_interleaved kernels e2e sweep. BUDGET_MIN sets the trained
# methods' budget (default 8), TRAINED the method list of the trained step (default: ours and the peer),
# TRAINED2 that of a second one (variants, say; its own results file),
# TASKS its zero-shot tasks (default piqa,arc_easy; empty for none). The sweep step compares recipes at
# a fixed step count on fixed teacher data, scored on WikiText-2 valid (tuning, not reporting):
# SWEEP its method list, SWEEP_STEPS the steps (default 800), SWEEP_ROWS the teacher rows (default 4096;
# 2048-token training rows need fewer, their KV cache is 4x larger). trained_best runs the sweep's best
# SparseForge method and best peer method (lowest valid ppl) side by side at the full budget, with BEST_AGAINST
# (a method list, optional) beside them. STEP_BATCHES: step_time's batch sizes;
# STEP_OUTLINE: the soft-loop compile modes step_time times beside auto (default on,regional; add off for the flat
# graph, a ~90 s compile); step_loop times regional only, hidden weights 0 and 3, with *_loop_ms and
# --host-report (~3.5 min); step_interleaved times the peer's plain KD loop, plain KD with SparseForge's
# loss and SparseForge's soft and hard loops round by round (step_time.py --timing interleaved, ~4 min). GPUS=N (default 1) runs the trained and
# sweep steps' methods in parallel, one process per method, N at a time (accuracy.py --gpus), on a machine with N GPUs.
# numerics runs graph_numerics.py --check first: if the captured graph is not the model under autocast,
# the session stops there (its trained runs would train a wrong function).
# OUT_DIR/session.log says which step ran, for how long, and its exit status.
# OUT_DIR/pgid holds the job's process group (started with setsid, the script leads it): to stop the
# job and whatever step it runs, `kill -- -$(cat OUT_DIR/pgid)`. (Not `pkill -f PATTERN`: the calling
# shell's own command line contains the pattern, and it killed the device call itself.)
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
                    --outline "${STEP_OUTLINE:-regional}"
                    --sample-batches 4096 --profile "$out/profile/step" --out "$out/step_time.json") ;;
    trained_best)  # the sweep's best SparseForge row and best peer row (valid), side by side at the full budget
      best=$(python3 -c "
import json, sys
rows = json.load(open(sys.argv[1]))['rows']
picks = [min(group, key=lambda r: r['wikitext2_ppl'])['method'] for group in
         ([r for r in rows if r['method'].startswith(p)] for p in ('sparseforge', 'sparsegpt+kd')) if group]
print(','.join(picks))" "$out/accuracy_smollm2-135m_sweep.json") && [ -n "$best" ] \
        || { echo "== trained_best: no sweep results" >> "$out/session.log"; continue; }
      cmd=(python -m benchmarks.accuracy --methods "$best${BEST_AGAINST:+,$BEST_AGAINST}" --budget-minutes "$budget"
           --tasks "$tasks" --also-valid --gpus "$gpus" --quiet --out "$out/accuracy_smollm2-135m_trained_best.json") ;;
    step_loop)  # today's GPU mode only (regional), both layer-wise weights, loop pace and where the host waits
      cmd=(python -m benchmarks.step_time --batch-sizes "${STEP_BATCHES:-32}" --hidden-weights 0,3 --compile on
           --outline regional --repeats 10 --sample-batches ''
           --host-report "$out/host/step" --out "$out/step_time_regional_loop.json") ;;
    step_interleaved)  # the loops side by side, round by round, at the default layer-wise weight
      cmd=(python -m benchmarks.step_time --batch-sizes "${STEP_BATCHES:-32}" --hidden-weights 3 --compile on
           --timing interleaved --rounds "${STEP_ROUNDS:-7}" --sample-batches '' --out "$out/step_time_interleaved.json") ;;
    kernels) cmd=(python -m benchmarks.kernel_table --out "$out/kernels.json") ;;
    e2e) cmd=(python -m benchmarks.e2e --out "$out/e2e.json") ;;
    *) echo "unknown step $step" >> "$out/session.log"; continue ;;
  esac
  echo "== $(date -u +%H:%M:%S) $step: ${cmd[*]}" >> "$out/session.log"
  start=$(date +%s)
  "${cmd[@]}" > "$out/$step.log" 2>&1
  rc=$?
  echo "== $(date -u +%H:%M:%S) $step rc=$rc in $(( $(date +%s) - start ))s" >> "$out/session.log"
  if [ "$step" = numerics ] && [ "$rc" != 0 ]; then  # the trained runs would train a wrong graph
    echo "== numerics failed: the captured graph is not the model under autocast; stopping" >> "$out/session.log"
    break
  fi
done
echo "== done" >> "$out/session.log"
