#!/usr/bin/env bash
# Train on several machines with torchrun and a c10d rendezvous: run this on every node with the same settings
# (only NODE_RANK differs). Arguments are Hydra overrides, passed through:
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/train_multi_node.sh run_dir=/shared/runs/exp1
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/train_multi_node.sh run_dir=/shared/runs/exp1
# run_dir must be on a filesystem every node sees (checkpoints are written by all ranks).
#
#   NNODES          number of nodes, or MIN:MAX for an elastic job (default 1)
#   NODE_RANK       this node's rank; node 0 hosts the rendezvous store (default SLURM_NODEID under srun).
#                   Unset: torchrun decides from whether the endpoint's address is one of this machine's
#   MASTER_ADDR     address of node 0, reachable from every node; MASTER_PORT its port (default 29500)
#   RDZV_ENDPOINT   host:port of the rendezvous, instead of MASTER_ADDR/MASTER_PORT
#   RDZV_ID         the same on every node of one job, different between jobs sharing an endpoint (default qwen2)
#   RDZV_READ_TIMEOUT  seconds a node waits for node 0's rendezvous store to answer (default 300)
#   LOCAL_ADDR      this node's address on the network the nodes share (default: its NodeAddr under srun, else
#                   torchrun's choice, the host name). The first node's workers host init_process_group's store
#                   there, on a free port torchrun picks (a store per rendezvous round, launch/common.sh): a
#                   firewall between the nodes must let them reach the first node's ephemeral ports, not only the
#                   rendezvous port
# and the ones of launch/common.sh (TORCHRUN, PYTHON, NPROC, MAX_RESTARTS, SHUTDOWN_TIMEOUT).
# A worker that crashes on any node restarts the workers of all nodes from the newest committed checkpoint.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

endpoint=${RDZV_ENDPOINT:-}
if [ -z "$endpoint" ]; then
    if [ -z "${MASTER_ADDR:-}" ]; then
        echo "error: set MASTER_ADDR (the address of node 0) or RDZV_ENDPOINT=host:port" >&2
        exit 2
    fi
    endpoint=$MASTER_ADDR:${MASTER_PORT:-29500}
fi
# How long a node waits for node 0's rendezvous store: torchrun's 60 s fails the nodes whose launch check (a python
# start, remote summaries to fetch) ended more than a minute before node 0's.
rdzv_conf=read_timeout=${RDZV_READ_TIMEOUT:-300}
node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
if [ -n "$node_rank" ]; then
    # Say who hosts the store rather than let torchrun guess from host names (which fails behind NAT and, on one
    # machine, makes every node think it is the host).
    if [ "$node_rank" = 0 ]; then is_host=true; else is_host=false; fi
    rdzv_conf+=",is_host=$is_host"
fi
rdzv_args=(--rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="${RDZV_ID:-qwen2}" --rdzv-conf="$rdzv_conf")
# The address the other nodes' workers reach this node at (torchrun's --local-addr: the first node's workers host
# the store of init_process_group there). torchrun's default is the host name, which need not resolve to the
# network the nodes share; under srun, this node's NodeAddr is used, as for the rendezvous endpoint.
local_addr=${LOCAL_ADDR:-}
if [ -z "$local_addr" ] && [ -n "${SLURMD_NODENAME:-}" ] && command -v scontrol >/dev/null 2>&1; then
    local_addr=$(scontrol show node "$SLURMD_NODENAME" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' || true)
fi
if [ -n "$local_addr" ]; then
    rdzv_args+=(--local-addr="$local_addr")
fi

if [[ ${NNODES:-1} =~ ^[0-9]+$ ]]; then
    world=$((NPROC * ${NNODES:-1}))
    # One worker per GPU of each node under srun, where sbatch --gpus=N (a total) may give the nodes different
    # numbers of GPUs (8 and 4): the world is then those N GPUs, not this node's count times the nodes. torchrun
    # numbers the ranks of nodes with different process counts; each worker validates the actual world again.
    if [ "$nproc_from" = slurm ] && [[ ${SLURM_GPUS:-} =~ ^([^:]*:)?([1-9][0-9]*)$ ]]; then
        world=${BASH_REMATCH[2]}
    fi
    check_job "$world" "$@"
fi  # an elastic MIN:MAX node count leaves the world size to the rendezvous: each worker validates it then
run_torchrun --nnodes="${NNODES:-1}" "${rdzv_args[@]}" "${common_args[@]}" "$@"
