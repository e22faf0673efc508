#!/usr/bin/env bash
# A throw-away single-node SLURM cluster (Debian's Slurm 22.05) for tests and laptops, run as root
# without systemd. Everything it writes lives in one state dir; every daemon it starts is recorded
# by pid there and stopped by that pid.
#
#   scripts/slurm_cluster.sh install   # apt-get the packages if missing (root, non-interactive)
#   scripts/slurm_cluster.sh start     # munge key, configs, daemons; waits until the node is idle
#   scripts/slurm_cluster.sh stop      # cancel jobs, stop the recorded daemons, wait for them
#   scripts/slurm_cluster.sh status    # daemons, sinfo, squeue
#   scripts/slurm_cluster.sh env       # prints `export SLURM_CONF=...` for sbatch/sinfo/submitit
#
# Environment: CE_SLURM_STATE (state dir, default /tmp/ce-slurm), CE_SLURM_ACCOUNTING (1: slurmdbd +
# a private MariaDB so sacct gives exact job states; 0: none), CE_SLURM_PORT (first of 4 ports,
# default 6817: slurmctld, slurmd, slurmdbd, MariaDB).
set -euo pipefail

STATE=${CE_SLURM_STATE:-/tmp/ce-slurm}
ACCOUNTING=${CE_SLURM_ACCOUNTING:-1}
PORT=${CE_SLURM_PORT:-6817}
CTLD_PORT=$PORT D_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3))
CLUSTER=ce
export SLURM_CONF=$STATE/slurm.conf
# Order matters: each daemon needs the ones before it; stop goes in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

die() { echo "slurm_cluster: $*" >&2; exit 2; }
log() { echo "slurm_cluster: $*"; }

packages() {
    local p=(slurmctld slurmd slurm-client munge)
    [ "$ACCOUNTING" = 1 ] && p+=(slurmdbd mariadb-server)
    echo "${p[@]}"
}

binaries() {
    local b=(slurmctld slurmd sinfo sbatch munged mungekey)
    [ "$ACCOUNTING" = 1 ] && b+=(slurmdbd mariadbd mariadb-install-db sacctmgr)
    echo "${b[@]}"
}

cmd_install() {
    local missing=0
    for b in $(binaries); do command -v "$b" >/dev/null || missing=1; done
    if [ $missing = 0 ]; then log "packages already installed"; return; fi
    [ "$(id -u)" = 0 ] || die "installing SLURM needs root (apt-get); run as root or install: $(packages)"
    command -v apt-get >/dev/null || die "no apt-get here; install $(packages) yourself"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d / no systemd: the packages' own services are not started; we start our own.
    apt-get install -y -qq --no-install-recommends $(packages) >/dev/null
    log "installed $(packages)"
}

pidfile() { echo "$STATE/pids/$1.pid"; }

# True when the recorded pid is alive and still runs that daemon (pids get reused).
alive() {
    local f pid
    f=$(pidfile "$1")
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$1"
}

# Starts a daemon in the foreground-mode of its own session; its pid is ours to record and stop.
launch() {
    local name=$1; shift
    setsid "$@" >"$STATE/log/$name.out" 2>&1 </dev/null &
    echo $! >"$(pidfile "$name")"
    local end=$((SECONDS + 5))  # until the forked shell has exec'd the daemon (alive checks its name)
    until alive "$name" || [ $SECONDS -ge $end ]; do sleep 0.05; done
}

wait_for() {  # wait_for SECONDS DAEMON COMMAND...: until COMMAND succeeds; fails early if DAEMON died
    local secs=$1 name=$2; shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        alive "$name" || die "$name exited: see $STATE/log/$name.out and $STATE/log/$name.log"
        [ $SECONDS -lt $end ] || die "timed out after ${secs}s waiting for $name (logs: $STATE/log)"
        sleep 0.2
    done
}

write_configs() {
    local cpus mem_mb
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc honours OMP_NUM_THREADS
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$STATE/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups in a container without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that asks no memory gets the whole node and jobs never share it.
DefMemPerCPU=1024
SchedulerType=sched/backfill
# Schedule every few seconds (defaults 60/30 s) so that requeued and dependent jobs start promptly.
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
# Short grace between SIGTERM and SIGKILL at a time limit; fast turnaround of finished jobs.
KillWait=5
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
$( [ "$ACCOUNTING" = 1 ] && cat <<ACC
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For slurmdbd connections this names the munge socket (clients ignore AuthInfo there).
AccountingStoragePass=$STATE/munge/munge.socket.2
ACC
)
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    if [ "$ACCOUNTING" = 1 ]; then
        cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$STATE/munge/munge.socket.2
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
        chmod 600 "$STATE/slurmdbd.conf"  # slurmdbd refuses a world-readable config (password)
    fi
}

start_munge() {
    [ -f "$STATE/munge/munge.key" ] || mungekey --create --force --keyfile="$STATE/munge/munge.key"
    chmod 600 "$STATE/munge/munge.key"
    launch munged munged --foreground --force --key-file="$STATE/munge/munge.key" \
        --socket="$STATE/munge/munge.socket.2" --pid-file="$STATE/run/munged.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_for 10 munged munge --socket="$STATE/munge/munge.socket.2" --string=ping
}

start_mariadb() {
    local sock=$STATE/run/mysqld.sock
    if [ ! -d "$STATE/mysql/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
    fi
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/run/mariadbd.pid" \
        --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900
    wait_for 30 mariadbd mariadb-admin --no-defaults --socket="$sock" ping
    mariadb --no-defaults --socket="$sock" -u root <<'SQL'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

start_slurmdbd() {
    launch slurmdbd slurmdbd -D  # reads slurmdbd.conf next to $SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -n list cluster
    # Register the cluster before slurmctld connects, so its first jobs are recorded.
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" ||
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

node_idle() { sinfo -h -n localhost -o %T | grep -qx idle; }

cmd_start() {
    local t0=$SECONDS
    for b in $(binaries); do command -v "$b" >/dev/null || die "$b not found: run '$0 install' first"; done
    [ "$(id -u)" = 0 ] || die "this single-node cluster runs its daemons as root"
    if alive slurmctld && alive slurmd; then log "already running ($STATE)"; return; fi
    cmd_stop >/dev/null 2>&1 || true  # half-started leftovers from a crash
    mkdir -p "$STATE"/{pids,run,log,munge,ctld,spool,mysql}
    chmod 755 "$STATE/munge"  # clients of any user need the socket; the key itself is 600
    write_configs
    start_munge
    if [ "$ACCOUNTING" = 1 ]; then start_mariadb; start_slurmdbd; fi
    launch slurmctld slurmctld -D -f "$SLURM_CONF"
    wait_for 30 slurmctld scontrol ping
    launch slurmd slurmd -D -N localhost -f "$SLURM_CONF"
    wait_for 30 slurmd node_idle
    log "started in $((SECONDS - t0))s (state $STATE, accounting=$ACCOUNTING); export SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
    # Jobs first, so that no slurmstepd is left behind by the slurmd we stop.
    if alive slurmctld; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        local end=$((SECONDS + 15))
        while [ -n "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
    fi
    local i name pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        alive "$name" || { rm -f "$(pidfile "$name")"; continue; }
        pid=$(cat "$(pidfile "$name")")
        kill -TERM "$pid" 2>/dev/null || true
        local end=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; log "$name ($pid) killed"; fi
        rm -f "$(pidfile "$name")"
        log "stopped $name ($pid)"
    done
}

cmd_status() {
    local name
    for name in "${DAEMONS[@]}"; do
        if alive "$name"; then echo "$name: running (pid $(cat "$(pidfile "$name")"))"; else echo "$name: stopped"; fi
    done
    if alive slurmctld; then sinfo; squeue; fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
