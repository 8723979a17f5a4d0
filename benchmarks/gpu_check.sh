#!/usr/bin/env bash
# One-shot GPU measurement of the real pipeline (deepspeed launcher, ZeRO-3, NF4 base, LoRA r=8 on all
# 7 projections, distillation, global pruning to 0.5) on a random-weight model of the Llama-3-8B shape,
# for a rented machine without network. Everything lands in $OUT (8 files at most; past that the run files
# are packed into runs.tgz):
#   env.txt                      nvidia-smi, versions, a bitsandbytes NF4 smoke test, ds_report
#   log.txt                      every stage's output
#   results.json                 stage timings and exit codes, all-reduce figures, each run's headline
#                                numbers (perf, peak memory, nvidia-smi samples); rewritten after each stage
#   run_NAME_summary.json        the run's summary.json (perf, peak_memory_mb, ...)
#   run_NAME_train_log.jsonl     the run's train_log.jsonl (also when the run was cut short)
# Every stage runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET_S; a failing stage does
# not stop the others (a run is skipped only when there is no model).
#
# On the GPU machine, from the repository root, with .whl and .gpudata carried (benchmarks/gpu_wheels.sh):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
# CPU rehearsal of the same script (tiny model, gloo, fp32, seq_len 128, few steps):
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh
# Settings (environment): GPU_CHECK_RUNS ("name|overrides;name|overrides", see RUNS below),
# GPU_CHECK_STEPS, _MBS, _SEQ, _WARMUP, _COOLDOWN, _EVERY, _BUDGET_S, _SHAPE, _WORK, _PYTHON, _SITE,
# _FORCE_SHIMS=1 (use benchmarks/gpu_shims even where datasets/matplotlib are installed).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
PY=${GPU_CHECK_PYTHON:-python3}
CPU=${GPU_CHECK_CPU:-0}
SITE=${GPU_CHECK_SITE:-/tmp/site}
T0=$(date +%s)
mkdir -p "$OUT" "$WORK/runs"
LOG=$OUT/log.txt
: >"$LOG"
: >"$WORK/stages.jsonl"
rm -rf "$WORK/allreduce.json" "$WORK/model.json" "$WORK"/smi_*.csv "$WORK"/progress_*.tsv "$WORK/runs"/*

if [[ $CPU == 1 ]]; then
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
  D_SHAPE=tiny D_DTYPE=fp32 D_SEQ=128 D_MBS=2 D_STEPS=8 D_WARMUP=0.1 D_COOLDOWN=0.5 D_EVERY=2
  D_BUDGET=600 DS_CONFIG=ds_configs/zero3_cpu.json AR_MIB=16 RUN_MIN_S=60
else
  # 30 steps: decisions at steps 5, 7, 9 and 10 (the final one), then 20 steps at the target widths.
  D_SHAPE=llama3-8b D_DTYPE=bf16 D_SEQ=2048 D_MBS=4 D_STEPS=30 D_WARMUP=0.1 D_COOLDOWN=0.66 D_EVERY=2
  D_BUDGET=400 DS_CONFIG=ds_configs/zero3.json AR_MIB=256 RUN_MIN_S=150
fi
SHAPE=${GPU_CHECK_SHAPE:-$D_SHAPE}
DTYPE=${GPU_CHECK_DTYPE:-$D_DTYPE}
SEQ=${GPU_CHECK_SEQ:-$D_SEQ}
MBS=${GPU_CHECK_MBS:-$D_MBS}
STEPS=${GPU_CHECK_STEPS:-$D_STEPS}
WARMUP=${GPU_CHECK_WARMUP:-$D_WARMUP}
COOLDOWN=${GPU_CHECK_COOLDOWN:-$D_COOLDOWN}
EVERY=${GPU_CHECK_EVERY:-$D_EVERY}
BUDGET_S=${GPU_CHECK_BUDGET_S:-$D_BUDGET}
MODEL=$WORK/model-$SHAPE-$DTYPE

# The runs, "name|dotted.key=value ..." separated by ";" (each run adds its overrides to the config below).
RUNS_DEFAULT="base|"
# >>> pruning.shrink: once that key exists, use this line instead (or pass GPU_CHECK_RUNS=...). Two runs of
# >>> 30 steps may not fit the 400 s budget: lower GPU_CHECK_STEPS (and keep the decision at about a third).
# RUNS_DEFAULT="base|;shrink|pruning.shrink=final"
RUNS=${GPU_CHECK_RUNS:-$RUNS_DEFAULT}

log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

collect() { "$PY" "$ROOT/benchmarks/gpu_model.py" --collect "$WORK" "$OUT" >>"$LOG" 2>&1 || true; }

record() { # NAME RC SECONDS TIMEOUT
  printf '{"stage": "%s", "rc": %d, "s": %d, "timeout_s": %d, "at_s": %d}\n' "$1" "$2" "$3" "$4" \
    "$(($(date +%s) - T0))" >>"$WORK/stages.jsonl"
  collect
}

# stage NAME MAX_S RESERVE_S CMD...: CMD under timeout, at most MAX_S and never into the last RESERVE_S
# seconds of the budget; output to log.txt (and stdout). Returns CMD's exit code (124: timed out).
stage() {
  local name=$1 max=$2 reserve=$3 t rc left
  shift 3
  left=$((BUDGET_S - ($(date +%s) - T0) - reserve))
  ((max > left)) && max=$left
  if ((max < 5)); then
    log "=== $name: skipped, ${left}s of the budget left"
    record "$name" 125 0 0
    return 125
  fi
  log "=== $name (timeout ${max}s): $*"
  t=$(date +%s)
  timeout -k 15 "$max" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  log "=== $name: exit $rc after $(($(date +%s) - t))s"
  record "$name" "$rc" "$(($(date +%s) - t))" "$max"
  return "$rc"
}

# While a run goes: nvidia-smi samples (GPU), and every 5 s the number of rows in its train_log.jsonl
# (progress_NAME.tsv: seconds since the run started, rows), with the log copied to $OUT, so that a run cut
# short still tells its step rate.
WATCH_PIDS=()
watch_start() { # NAME RUN_DIR
  if [[ $CPU != 1 ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 1000 \
      >"$WORK/smi_$1.csv" 2>/dev/null &
    WATCH_PIDS+=($!)
  fi
  (
    start=$(date +%s)
    while sleep 5; do
      if [[ -f $2/train_log.jsonl ]]; then
        echo "$(($(date +%s) - start)) $(wc -l <"$2/train_log.jsonl")" >>"$WORK/progress_$1.tsv"
        cp "$2/train_log.jsonl" "$OUT/run_$1_train_log.jsonl" 2>/dev/null
      fi
    done
  ) &
  WATCH_PIDS+=($!)
}
watch_stop() {
  local pid
  for pid in "${WATCH_PIDS[@]}"; do
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  WATCH_PIDS=()
}
trap 'watch_stop; collect' EXIT

# Python path: the wheels installed with --target, the repository (the pipeline is not pip-installed
# there), and the stand-ins of benchmarks/gpu_shims for packages that machine lacks.
case ":${PYTHONPATH:-}:" in *":$ROOT:"*) ;; *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" ;; esac
if [[ -d $SITE ]]; then
  case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE:$PYTHONPATH" ;; esac
fi
for pkg in datasets matplotlib; do
  if [[ ${GPU_CHECK_FORCE_SHIMS:-0} == 1 ]] || ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
    export PYTHONPATH="$ROOT/benchmarks/gpu_shims/$pkg:$PYTHONPATH"
    log "$pkg: using the stand-in in benchmarks/gpu_shims/$pkg"
  fi
done
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# transformers 5.25 kernelizes every from_pretrained by default, which needs the `kernels` package and hub
# downloads; neither is possible offline, so the layers stay transformers' own PyTorch ones.
export USE_HUB_KERNELS=${USE_HUB_KERNELS:-NO}
log "cpu=$CPU shape=$SHAPE dtype=$DTYPE seq=$SEQ mbs=$MBS steps=$STEPS warmup=$WARMUP cooldown=$COOLDOWN every=$EVERY budget=${BUDGET_S}s runs='$RUNS'"
log "PYTHONPATH=$PYTHONPATH"

for f in .gpudata/train.txt .gpudata/tokenizer/tokenizer.json .gpudata/tokenizer/tokenizer_config.json; do
  [[ -f $f ]] || log "MISSING $f: carry .gpudata (benchmarks/gpu_wheels.sh writes it)"
done

# a. environment
env_report() {
  date
  echo "--- nvidia-smi"
  timeout 30 nvidia-smi 2>&1
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  echo "--- versions, bitsandbytes NF4 smoke test"
  timeout 90 "$PY" "$ROOT/benchmarks/gpu_model.py" --env 2>&1
  echo "--- ds_report"
  timeout 60 "$PY" -m deepspeed.env_report 2>&1
  echo "--- memory, disk"
  free -g 2>&1
  df -h /tmp 2>&1
  echo "--- PYTHONPATH=$PYTHONPATH"
}
t=$(date +%s)
log "=== env -> env.txt"
env_report >"$OUT/env.txt" 2>&1
record env 0 "$(($(date +%s) - t))" 0
grep -E '^(torch|deepspeed|bitsandbytes|transformers|peft|device|bitsandbytes NF4|bitsandbytes native)' "$OUT/env.txt" | tee -a "$LOG"

# d. all-reduce (NCCL on the GPU, gloo in the CPU rehearsal)
stage allreduce 60 0 "$PY" benchmarks/gpu_model.py --allreduce --mib "$AR_MIB" --json "$WORK/allreduce.json"

# b. the model (weights made on the device, written to local disk)
stage model 240 0 "$PY" benchmarks/gpu_model.py --shape "$SHAPE" --out "$MODEL" --dtype "$DTYPE" \
  --tokenizer .gpudata/tokenizer --json "$WORK/model.json"

# c. the runs
CONFIG=$WORK/config.yaml
cat >"$CONFIG" <<EOF
# written by benchmarks/gpu_check.sh
model:
  path: $MODEL
  quantization: nf4
  dtype: $DTYPE
lora:
  r: 8
  alpha: 16
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
data:
  train: $ROOT/.gpudata/train.txt
  seq_len: $SEQ
  num_proc: 1
  cache_dir: $WORK/data_cache
train:
  steps: $STEPS
  micro_batch_size: $MBS
  grad_accum: 1
  lr: 0.0001
  log_every: 1
  resume: none
pruning:
  target_sparsity: 0.5
  criterion: lora
  scope: global
  warmup: $WARMUP
  cooldown: $COOLDOWN
  prune_every: $EVERY
distill:
  enabled: true
deepspeed:
  config: $ROOT/$DS_CONFIG
logging:
  report_to: none
output:
  overwrite: true
EOF
log "config $CONFIG:"
tee -a "$LOG" <"$CONFIG" >/dev/null

# run NAME EXTRA_OVERRIDES... : one pipeline run, its summary and train log copied to $OUT
run() {
  local name=$1 dir=$WORK/runs/$1 port rc reserve
  shift
  rm -rf "$dir" "$WORK/progress_$name.tsv"
  port=$((29500 + RANDOM % 2000))
  reserve=$(((n_runs - i) * RUN_MIN_S)) # time kept for the runs after this one
  watch_start "$name" "$dir"
  stage "run_$name" 100000 "$reserve" \
    "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" \
    pipeline/run.py --config "$CONFIG" "output.dir=$dir" "$@"
  rc=$?
  watch_stop
  [[ -f $dir/summary.json ]] && cp "$dir/summary.json" "$OUT/run_${name}_summary.json"
  [[ -f $dir/train_log.jsonl ]] && cp "$dir/train_log.jsonl" "$OUT/run_${name}_train_log.jsonl"
  collect
  return "$rc"
}

IFS=';' read -r -a RUN_LIST <<<"$RUNS"
n_runs=${#RUN_LIST[@]}
i=0
for entry in "${RUN_LIST[@]}"; do
  i=$((i + 1))
  name=${entry%%|*}
  extra=${entry#*|}
  [[ $entry == *"|"* ]] || extra=
  [[ -n $name ]] || continue
  if [[ ! -f $MODEL/gpu_model.json ]]; then
    log "=== run_$name: skipped, no model at $MODEL"
    record "run_$name" 126 0 0
    continue
  fi
  read -r -a extra_args <<<"$extra"
  lines=$(wc -l <"$LOG")
  run "$name" "${extra_args[@]}" && continue
  # Out of GPU memory: once, the same run at half the micro-batch, if the budget still allows a run.
  if tail -n +"$lines" "$LOG" | grep -qE 'OutOfMemoryError|CUDA out of memory' && ((MBS > 1)); then
    log "=== run_$name ran out of memory at micro_batch_size=$MBS; again at $((MBS / 2))"
    run "${name}_mbs$((MBS / 2))" "${extra_args[@]}" "train.micro_batch_size=$((MBS / 2))"
  fi
done

collect
# At most 8 files come back: with more runs (or an out-of-memory retry) the run files go into one archive.
if (($(find "$OUT" -maxdepth 1 -type f | wc -l) > 8)); then
  (cd "$OUT" && tar czf runs.tgz run_* && rm -f run_*) && log "run files packed into runs.tgz (more than 8 files)"
fi
log "=== done in $(($(date +%s) - T0))s; results:"
"$PY" benchmarks/gpu_model.py --print "$OUT/results.json" 2>&1 | tee -a "$LOG"
