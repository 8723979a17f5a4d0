#!/usr/bin/env bash
# Prune while LoRA fine-tuning a Llama-70B-class model (GQA: 64 query / 8 KV heads, hidden 8192,
# MLP 28672, 80 layers) with ZeRO-3 and a frozen NF4 base, on N nodes x 8 GPUs: srun starts one
# launcher per node (deepspeed --no_ssh, or torchrun), which starts one rank per GPU.
#
#   sbatch slurm/prune_70b.sh configs/llama70b.yaml pruning.target_sparsity=0.3
#   sbatch --nodes=4 slurm/prune_70b.sh configs/llama3_70b.yaml train.steps=500
#
# Submit from the repository root: the job runs in $SLURM_SUBMIT_DIR, which every node must see
# (code, config, hostfile, output.dir). Per-GPU memory and traffic for a node count: tools/plan.py.
#
# Edit per site:
#   * the #SBATCH lines below: partition and account (remove one '#' to enable), time, GPUs and
#     CPUs per node;
#   * the "site environment" block: venv / module activation, and NCCL_SOCKET_IFNAME (the network
#     interface of the inter-node fabric, see `ip addr`; e.g. ib0, eth0, ens*, hsn0).
#
# Environment knobs, [default]:
#   LAUNCHER [deepspeed]        deepspeed | torchrun | srun (one task per GPU, no launcher: see below)
#   REQUEUE [1]                 requeue the job when the run stopped on SIGTERM after a checkpoint
#   GPUS_PER_NODE [$SLURM_GPUS_ON_NODE, else 8]
#   MASTER_ADDR [first host of the allocation], MASTER_PORT [20000 + SLURM_JOB_ID % 20000]
#   DEEPSPEED_TIMEOUT [60]      minutes any collective may wait; covers every rank loading the 4-bit model
#   HOSTFILE [runs/slurm/hostfile-$SLURM_JOB_ID]
#   SRUN [srun], SCONTROL [scontrol], PYTHON [python]   commands; the tests put local stand-ins here
#
# Time limit and preemption: Slurm sends SIGTERM 10 min before the limit (--signal); the ranks
# agree on it at the next step, save a checkpoint in output.dir/checkpoints and exit with 75; the
# job is then requeued and train.resume=auto continues from that checkpoint. The deepspeed and
# torchrun launchers SIGKILL their ranks 30 s after forwarding SIGTERM, which a 70B step plus a
# save can exceed: set train.save_every so a periodic checkpoint is never far back, or use
# LAUNCHER=srun, where Slurm signals every rank directly and waits until the limit.
#
#SBATCH --job-name=prune-70b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@600
#SBATCH --requeue
#SBATCH --open-mode=append
##SBATCH --partition=CHANGE_ME
##SBATCH --account=CHANGE_ME

set -euo pipefail

if (($# < 1)); then
    echo "usage: sbatch slurm/prune_70b.sh CONFIG.yaml [dotted.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

# --- site environment (edit) -------------------------------------------------------------------
# source /path/to/lora-prune-pipeline/.venv/bin/activate    # or: module load ...; conda activate ...
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0      # interface for NCCL/gloo bootstrap traffic
# export NCCL_IB_HCA=mlx5                                    # InfiniBand adapters, if the fabric has them
# export NCCL_DEBUG=WARN                                     # INFO when a collective hangs
# ------------------------------------------------------------------------------------------------

# Compute nodes never download: model.path and data.* must be local paths.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Every rank loads the whole 4-bit model before ZeRO-3 partitions it (quantized models skip
# zero.Init), from a shared filesystem at once; the default 10-30 min can run out. Read by
# pipeline/dist/comm.py init() as the process-group timeout.
export DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-60}
# A failed or timed-out collective aborts the rank (and srun --kill-on-bad-exit the job) instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
# srun (Slurm >= 22.05) no longer inherits --cpus-per-task: without this the launcher and its 8
# ranks would share one core.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

SRUN=${SRUN:-srun}
SCONTROL=${SCONTROL:-scontrol}
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-deepspeed}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
: "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}" "${SLURM_JOB_NODELIST:?}"

cd "${SLURM_SUBMIT_DIR:-$PWD}"
if [[ ! -f $CONFIG ]]; then
    echo "error: config $CONFIG not found in $PWD (submit from the repository root)" >&2
    exit 2
fi
# Fail here, once, rather than on every rank after the allocation has started them all: the config,
# model directory, data files and DeepSpeed JSON, without loading weights (lora-prune validate).
"$PYTHON" -m pipeline validate "$CONFIG" "$@"

mapfile -t HOSTS < <("$SCONTROL" show hostnames "$SLURM_JOB_NODELIST")
NNODES=${#HOSTS[@]}
if ((NNODES == 0)); then
    echo "error: '$SCONTROL show hostnames $SLURM_JOB_NODELIST' listed no hosts" >&2
    exit 1
fi
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
# Same rule as pipeline/dist/launch_env.py: one port per job, so jobs sharing a node do not collide.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# deepspeed --no_ssh reads the node list and slots from a hostfile, on every node: shared filesystem.
HOSTFILE=${HOSTFILE:-runs/slurm/hostfile-$SLURM_JOB_ID}
mkdir -p "$(dirname "$HOSTFILE")"
for host in "${HOSTS[@]}"; do
    echo "$host slots=$GPUS_PER_NODE"
done >"$HOSTFILE"

case $LAUNCHER in
deepspeed)
    LAUNCH=(deepspeed --no_ssh --hostfile="$HOSTFILE" --num_nodes="$NNODES" --num_gpus="$GPUS_PER_NODE"
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
    ;;
torchrun)
    LAUNCH=(torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
    ;;
srun)
    # Ranks find their place from SLURM_PROCID/SLURM_LOCALID (pipeline/dist/launch_env.py).
    export MASTER_ADDR MASTER_PORT
    ;;
*)
    echo "error: LAUNCHER=$LAUNCHER: use deepspeed, torchrun or srun" >&2
    exit 2
    ;;
esac

echo "job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPU(s), $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT," \
    "config $CONFIG $*"

rc=0
if [[ $LAUNCHER == srun ]]; then
    "$SRUN" --nodes="$NNODES" --ntasks=$((NNODES * GPUS_PER_NODE)) --ntasks-per-node="$GPUS_PER_NODE" \
        --kill-on-bad-exit=1 "$PYTHON" pipeline/run.py --config "$CONFIG" "$@" || rc=$?
else
    # One launcher per node. Its --node_rank must be that node's SLURM_NODEID, so it is expanded by
    # the shell srun starts there (single quotes).
    # shellcheck disable=SC2016
    "$SRUN" --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c 'exec "$0" --node_rank="$SLURM_NODEID" "$@"' \
        "${LAUNCH[@]}" pipeline/run.py --config "$CONFIG" "$@" || rc=$?
fi
# 75: stopped by SIGTERM/SIGINT, after saving a checkpoint or before the first step (pipeline/train/stops.py EXIT_PREEMPTED).
if ((rc == 75)) && [[ ${REQUEUE:-1} == 1 ]]; then
    echo "job $SLURM_JOB_ID: stopped on SIGTERM (checkpoint saved, if any); requeued, it resumes from there (train.resume=auto)"
    "$SCONTROL" requeue "$SLURM_JOB_ID"
fi
exit "$rc"
