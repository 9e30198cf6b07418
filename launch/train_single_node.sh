#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU (or NPROC processes; CPU/gloo when there is no GPU).
# Arguments are Hydra overrides, passed through:
#   NPROC=4 bash launch/train_single_node.sh model=tiny run_dir=runs/exp1 train.global_batch_size=16
# A worker that crashes restarts the job from the newest committed checkpoint (up to MAX_RESTARTS times).
# Environment: see launch/common.sh (TORCHRUN, PYTHON, NPROC, MAX_RESTARTS, SHUTDOWN_TIMEOUT).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

check_job "$NPROC" "$@"
run_torchrun --standalone --nnodes=1 "${common_args[@]}" "$@"
