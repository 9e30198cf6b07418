# Sourced by train_single_node.sh and train_multi_node.sh (and, through them, slurm/train.sbatch):
# which torchrun to run, how many processes per node, and the torchrun flags both launchers share.
#
#   TORCHRUN          the torchrun command, split on spaces (e.g. "torchrun" or "/opt/env/bin/torchrun"); it exits 1
#                     also when the trainers stopped on purpose (2: a config or data error; 3: a training halt)
#   PYTHON            else: run "$PYTHON -m qwen2_dist.cli.torchrun" (torchrun in the same process, whose exit code
#                     is then 2 or 3 for such a stop); default $VENV/bin/python (VENV as given to
#                     launch/install.sh), else the repository's .venv/bin/python when it exists, else python3 on PATH
#   NPROC             processes per node; default the GPUs of this node: Slurm's count for it (SLURM_GPUS_ON_NODE,
#                     set per node under srun), else nvidia-smi's count (or fewer when CUDA_VISIBLE_DEVICES names
#                     fewer), else 1. On CUDA, more than the node's GPUs is refused before torchrun starts
#   MAX_RESTARTS      torchrun --max-restarts: how many times a failed worker group is restarted, resuming from
#                     the newest committed checkpoint (default 3)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives workers to save a checkpoint and exit after a stop signal before it
#                     kills them (default 300; older torchrun versions ignore it and wait 30 s)
# shellcheck shell=bash disable=SC2034  # the variables set here are used by the scripts that source this file

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# One interpreter for torchrun and for check_job below, so the job is checked by the qwen2_dist that will run it;
# with TORCHRUN set, the python next to that torchrun when there is one.
if [ -n "${TORCHRUN:-}" ]; then
    read -r -a torchrun <<< "$TORCHRUN"
    python=python3
    torchrun_path=$(command -v "${torchrun[0]}" || true)  # TORCHRUN=torchrun: the one on PATH
    if [ -n "$torchrun_path" ] && [ -x "$(dirname "$torchrun_path")/python" ]; then
        python=$(dirname "$torchrun_path")/python
    fi
else
    if [ -n "${PYTHON:-}" ]; then
        python=$PYTHON
    elif [ -n "${VENV:-}" ] && [ -x "$VENV/bin/python" ]; then
        python=$VENV/bin/python
    elif [ -x "$repo/.venv/bin/python" ]; then
        python=$repo/.venv/bin/python
    else
        python=python3
    fi
    torchrun=("$python" -m qwen2_dist.cli.torchrun)
fi

# The GPUs of this node as the launcher knows them (Slurm's count for the node, else nvidia-smi's when it sets
# NPROC): the launch check then refuses a torch that sees none, which would train every process on the CPU.
# nproc_from says where NPROC came from (given, slurm, nvidia-smi or default).
launch_gpus=0
if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
    launch_gpus=$SLURM_GPUS_ON_NODE
fi
if [ -n "${NPROC:-}" ]; then
    if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
        echo "error: NPROC=$NPROC: give the number of processes per node (e.g. NPROC=8), or leave it unset for" \
            "one per GPU" >&2
        exit 2
    fi
    nproc_from=given
elif [ "$launch_gpus" -gt 0 ]; then
    # Under srun, each node's own count: the nodes of one job may have different numbers of GPUs.
    NPROC=$launch_gpus
    nproc_from=slurm
else
    NPROC=1
    nproc_from=default
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
        # nvidia-smi lists every GPU of the machine; the workers see only those CUDA_VISIBLE_DEVICES names (none
        # when it is set but empty), as under Slurm or a shared machine.
        # CUDA reads the list up to its first entry that names no GPU: CUDA_VISIBLE_DEVICES=-1 (or NoDevFiles), the
        # usual way to hide them all, leaves none, not one.
        if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
            IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
            named=0
            for entry in "${visible[@]}"; do
                entry=${entry//[[:space:]]/}
                if [[ $entry =~ ^[0-9]+$ && $((10#$entry)) -lt $gpus ]] || [[ $entry =~ ^(GPU|MIG)- ]]; then
                    named=$((named + 1))
                else
                    break
                fi
            done
            if [ "$named" -lt "$gpus" ]; then
                gpus=$named
            fi
        fi
        if [ "$gpus" -gt 0 ]; then
            NPROC=$gpus
            launch_gpus=$gpus
            nproc_from=nvidia-smi
        fi
    fi
fi

# Preemption: the trainer saves a checkpoint and stops on SIGTERM or SIGUSR1 (qwen2_dist/train/trainer.py).
# torchrun forwards the signals it handles to its workers and waits SHUTDOWN_TIMEOUT for them; SIGUSR1 is not
# among its defaults, hence PET_SIGNALS_TO_HANDLE. An older torchrun that ignores that variable must not die of
# SIGUSR1 either: ignored by run_torchrun below, the signal still reaches the trainers when sent to the workers
# (Slurm signals every process of a job step), because the handler a trainer installs replaces an inherited "ignore".
# Not before: a SIGUSR1 during a launch check of its own then ends this script, and one during our torchrun's check
# (or before its workers start) ends that torchrun, so the job step ends and slurm/train.sbatch requeues the job,
# instead of the signal being lost and the run training on.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}}
# Whole numbers, checked here: torchrun would end with a traceback (a timeout of 5m) or its usage text (restarts 3x).
if ! [[ $TORCH_ELASTIC_SHUTDOWN_TIMEOUT =~ ^[0-9]+$ ]]; then
    name=SHUTDOWN_TIMEOUT
    [ -n "${SHUTDOWN_TIMEOUT:-}" ] || name=TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    echo "error: $name=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT: give whole seconds torchrun waits for its workers to stop" \
        "(default 300)" >&2
    exit 2
fi
if ! [[ ${MAX_RESTARTS:-3} =~ ^[0-9]+$ ]]; then
    echo "error: MAX_RESTARTS=$MAX_RESTARTS: give how many times torchrun restarts failed workers, a whole number" \
        "(default 3; 0: never)" >&2
    exit 2
fi

# run_torchrun ARGS...: this script becomes torchrun (exec: the signals sent to it reach torchrun).
run_torchrun() {
    trap '' USR1
    exec "${torchrun[@]}" "$@"
}

# By default torch 2.13's agents keep one TCP store for all rendezvous rounds; restarting the workers of a 2-node
# job after one of them failed then hung in init_process_group (2 of 2 tries here), and never with a fresh store
# per round, which this asks for.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

common_args=(--nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" -m qwen2_dist.cli.train)

# check_job WORLD_SIZE OVERRIDES...: compose and validate the job once, before torchrun starts anything. A wrong
# override or a layout that does not divide the world is then one line and exit 2, instead of every worker failing
# and torchrun restarting them all MAX_RESTARTS times. A run whose newest checkpoint is already at train.steps
# launches nothing on one node: the launcher ends with 0 (a finished job submitted again would otherwise load that
# checkpoint to find nothing to train). With several nodes, each deciding alone could disagree (a file one node sees
# late): they launch, and the trainers find the run complete together (slurm/train.sbatch decides it once, before
# its job step). PRECHECK=0 turns the check off. Our torchrun (TORCHRUN unset) checks the job itself, in its own
# process before torchrun starts (QWEN2_LAUNCH_CHECK, qwen2_dist/cli/torchrun.py): one python start and torch import
# less per launch; with another torchrun, a python of its own runs the check here first (exit 10: the run is
# complete).
unset QWEN2_LAUNCH_CHECK  # set by check_job only
check_job() {
    local world=$1 rc=0
    shift
    [ "${PRECHECK:-1}" = 1 ] || return 0
    if [ -z "${TORCHRUN:-}" ]; then
        export QWEN2_LAUNCH_CHECK=$world QWEN2_LAUNCH_GPUS=$launch_gpus QWEN2_LAUNCH_NPROC=$NPROC
        return 0
    fi
    QWEN2_CHECK_ONLY=$world QWEN2_LAUNCH_GPUS=$launch_gpus QWEN2_LAUNCH_NPROC=$NPROC "$python" -m qwen2_dist.cli.train \
        "$@" || rc=$?
    if [ "$rc" = 10 ]; then
        if [ "${NNODES:-1}" = 1 ]; then
            exit 0
        fi
        echo "launching all the same: with NNODES=${NNODES:-1}, this node does not decide alone (the trainers find" \
            "the run complete together)"
        rc=0
    fi
    return "$rc"
}
