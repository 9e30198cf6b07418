#!/usr/bin/env bash
# A real Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd emulating nodes n1 and n2,
# loopback only, every file (config, keys, state, spool, logs, pid files) under one directory.
#
#   tests/slurm/cluster.sh start DIR   start it (waits until both nodes are idle); then use it with
#                                      SLURM_CONF=DIR/slurm.conf sbatch ...
#   tests/slurm/cluster.sh stop DIR    cancel every job, wait for them to end, stop the daemons (by pid file)
#
# Needs root and Debian's packages slurmctld slurmd slurm-client munge (Slurm 22.05 is built with MULTIPLE_SLURMD,
# so one machine can run several slurmd, each on its own port). The ports come from the environment, so two
# clusters can run side by side: SLURMCTLD_PORT (default 16817), SLURMD_PORTS (default "17001 17002").
# What was measured to work here: ../shared/notes/slurm-on-one-machine.md (linuxproc process tracking, no task
# plugin, cred_expire=10 so a requeued job restarts after ~12 s instead of ~121 s).
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf
export PATH=$PATH:/usr/sbin:/sbin

start() {
    local ctld_port=${SLURMCTLD_PORT:-16817} node_ports host cpus
    read -r -a node_ports <<< "${SLURMD_PORTS:-17001 17002}"
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    chmod 700 "$dir/munge"

    # A private munge key and socket: nothing outside DIR is touched. --force: munged otherwise refuses a socket
    # whose parent directories are not world-executable (temporary directories are 0700).
    if [ ! -f "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" --log-file="$dir/log/munged.log"

    cat > "$dir/task_prolog.sh" <<EOF
#!/bin/sh
echo "export TMPDIR=$dir/tmp/\$SLURMD_NODENAME"
EOF
    chmod +x "$dir/task_prolog.sh"

    cat > "$conf" <<EOF
ClusterName=qwen2ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
TaskProlog=$dir/task_prolog.sh
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${node_ports[0]} CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${node_ports[1]} CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF

    slurmctld -f "$conf"
    # Each node gets what a real node has to itself: its own /dev/shm (a mount namespace with a fresh tmpfs, which
    # the job steps the slurmd starts inherit) and its own TMPDIR (set by the task prolog). Shared memory and lock
    # files of the data loader are per node; two nodes of one job on one /dev/shm would collide.
    local node
    for node in n1 n2; do
        mkdir -p "$dir/tmp/$node"
        # shellcheck disable=SC2016  # $1 and $2 are expanded by the inner shell
        unshare --mount --propagation private -- bash -c \
            'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec slurmd -f "$1" -N "$2"' slurmd "$conf" "$node"
    done

    local waited=0
    until [ "$(sinfo --Node --noheader --states=idle --format=%N 2>/dev/null | sort -u | tr '\n' ' ')" = "n1 n2 " ]; do
        if [ "$waited" -ge 300 ]; then
            echo "error: the nodes did not come up in 30 s; logs in $dir/log" >&2
            sinfo >&2 || true
            exit 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "cluster up: SLURM_CONF=$conf"
}

any_alive() {
    local pid
    for pid in "$@"; do
        if kill -0 "$pid" 2>/dev/null; then return 0; fi
    done
    return 1
}

# Stop the daemons whose pid files are given, and wait for them to exit (SIGKILL after 10 s).
stop_daemons() {
    local pid_file pids=() waited=0
    for pid_file in "$@"; do
        if [ -f "$pid_file" ]; then
            pids+=("$(cat "$pid_file")")
            rm -f "$pid_file"
        fi
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    while any_alive "${pids[@]}" && [ "$waited" -lt 100 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

stop() {
    if [ -f "$dir/slurmctld.pid" ]; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        local waited=0
        while [ -n "$(squeue --noheader --format=%i 2>/dev/null)" ] && [ "$waited" -lt 400 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    stop_daemons "$dir/slurmd-n1.pid" "$dir/slurmd-n2.pid" "$dir/slurmctld.pid"
    stop_daemons "$dir/munge/munged.pid"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
