#!/usr/bin/env bash
# Start a real single-node SLURM (munged, MariaDB, slurmdbd, slurmctld, slurmd) for megalite's tests.
#
#   slurm/testcluster/start.sh [DIR]      # DIR: $MEGALITE_SLURM_DIR or /tmp/megalite-slurm
#   source slurm/testcluster/env.sh [DIR] # then sinfo, sbatch, submitit ... talk to it
#
# Everything it writes (configs, munge key, state, spool, logs, pid files, the MariaDB datadir and
# sockets) lives under DIR; no systemd, no /etc. Idempotent: a healthy cluster with the same config is
# left alone; a half-up one (or one whose config this script would now write differently) is stopped
# with stop.sh and started again. Needs root (the daemons run as root) and installs the Debian
# packages it needs when they are missing. Ports: $MEGALITE_SLURM_PORT (default 6817) for
# slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB, all on 127.0.0.1. See README.md for the layout.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-${MEGALITE_SLURM_DIR:-/tmp/megalite-slurm}}
PORT=${MEGALITE_SLURM_PORT:-6817}
CPUS=${MEGALITE_SLURM_CPUS:-8}
CLUSTER=megalite
ACCOUNT=megalite
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
T0=$(date +%s.%N)

say() { echo "start.sh: $*" >&2; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

die() { # die MESSAGE [DAEMON]: the message, then the tail of that daemon's log
    say "ERROR: $1"
    if [[ -n ${2:-} && -s $DIR/log/$2.log ]]; then
        echo "---- last lines of $DIR/log/$2.log ----" >&2
        tail -n 25 "$DIR/log/$2.log" >&2
        echo "----" >&2
    fi
    exit 1
}

[[ $(id -u) == 0 ]] || die "run as root: the daemons run as root (SlurmUser=root)"
[[ $CPUS =~ ^[0-9]+$ ]] || die "MEGALITE_SLURM_CPUS must be a number, got '$CPUS'"
mkdir -p "$DIR"
chmod 0755 "$DIR"
DIR=$(cd "$DIR" && pwd)
# Unix socket paths are limited to 108 bytes.
((${#DIR} <= 80)) || die "DIR is too long for unix socket paths (${#DIR} > 80 chars): $DIR"
# munged refuses a socket under a folder that not everyone may traverse (pytest's tmp_path is 0700).
for d in "$DIR" $(p=$DIR; while [[ $p != / ]]; do p=$(dirname "$p"); echo "$p"; done); do
    [[ $(($(stat -c 0%a "$d") & 1)) == 1 ]] ||
        die "munged needs every parent of DIR to be executable by all; $d is mode $(stat -c %a "$d")"
done

ensure_packages() {
    local missing=() p out
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] ||
            missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "needs apt-get to install ${missing[*]} (Debian's packages)"
    say "installing Debian packages for a real single-node SLURM (megalite's SLURM tests):" \
        "${missing[*]} (apt-get as root, no recommends; ~1 min)"
    export DEBIAN_FRONTEND=noninteractive
    if ! out=$(apt-get install -y --no-install-recommends "${missing[@]}" 2>&1); then
        if grep -Eq 'Unable to locate package|has no installation candidate|Failed to fetch' \
            <<<"$out"; then
            say "package lists missing or stale: apt-get update"
            apt-get update -q >/dev/null || die "apt-get update failed"
            apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
                die "apt-get install ${missing[*]} failed"
        else
            echo "$out" | tail -n 20 >&2
            die "apt-get install ${missing[*]} failed"
        fi
    fi
}

# --- configuration -----------------------------------------------------------------------------
NODE=$(hostname -s)
MUNGE_SOCKET=$DIR/munge-socket/munge.socket
DB_SOCKET=$DIR/run/mariadbd.sock
DB_PORT=$((PORT + 3))
DB_PASS=megalite  # a sandbox on 127.0.0.1; slurmdbd.conf is mode 600 anyway

# Job ids continue across stop/start (slurmctld keeps its state); a purged DIR starts numbering at
# a time-derived id, so its jobs never reuse an id of an earlier cluster (submitit folders, run
# folders named after the job, and sacct records are keyed by it).
[[ -s $DIR/first-job-id ]] || echo $(($(date +%s) % 60000000 + 1000)) >"$DIR/first-job-id"
FIRST_JOB_ID=$(<"$DIR/first-job-id")

slurm_conf() {
    local hw mem
    hw=$(slurmd -C | head -n 1) || die "slurmd -C failed"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $mem ]] || die "cannot read RealMemory from 'slurmd -C': $hw"
    cat <<EOF
# Written by slurm/testcluster/start.sh: a single-node test cluster. Do not edit, edit the script.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: track job processes through /proc, do not bind tasks to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
FirstJobId=$FIRST_JOB_ID
# Seconds between SIGTERM and SIGKILL when a job ends early; submitit ignores SIGTERM, so every
# requeue or cancel of a submitit job waits this long.
KillWait=5
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
# Cores are the consumable resource, memory is not: memory never blocks scheduling.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A job in 'high' preempts jobs in 'debug': they get their --signal signal at once (not only SIGTERM),
# GraceTime seconds to checkpoint, then are requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageEnforce=associations
# The node offers $CPUS CPUs whatever the hardware has (config_overrides keeps it from being drained
# for having fewer), so that several 2-task jobs run at once on a small machine.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
# OverSubscribe=EXCLUSIVE: a job in 'high' takes the whole node, so it always preempts 'debug'.
PartitionName=high Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=EXCLUSIVE
EOF
}

slurmdbd_conf() {
    cat <<EOF
# Written by slurm/testcluster/start.sh. Mode 600: it holds the database password.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

# --- daemon bookkeeping ------------------------------------------------------------------------
# shellcheck source=slurm/testcluster/pids.sh
source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

wait_for() { # wait_for SECONDS DAEMON DESCRIPTION COMMAND...: poll COMMAND until it succeeds
    local limit=$1 daemon=$2 what=$3
    local deadline=$((SECONDS + limit))
    shift 3
    until "$@" >/dev/null 2>&1; do
        # Exited: its pid file names a dead process, or it wrote none within 5 s.
        if [[ -n $daemon ]] && ! pid_of "$daemon" >/dev/null &&
            { [[ -s $DIR/run/$daemon.pid ]] || ((SECONDS > deadline - limit + 5)); }; then
            die "$daemon exited (while waiting for $what)" "$daemon"
        fi
        ((SECONDS < deadline)) || die "timed out after $limit s waiting for $what" "$daemon"
        sleep 0.2
    done
}

spawn() { # spawn [--bg] DAEMON ARGS...: run it without our open fds (the lock!), output to its log
    local bg=0 name
    [[ $1 == --bg ]] && bg=1 && shift
    name=$1
    shift
    _detached() {
        local fd
        for fd in "/proc/$BASHPID/fd"/*; do
            fd=${fd##*/}
            ((fd > 2)) && eval "exec $fd>&-"
        done
        exec "$@" </dev/null >>"$DIR/log/$name.log" 2>&1
    }
    if ((bg)); then (_detached "$@") & else (_detached "$@"); fi
}

healthy() { # all daemons alive, controller and node usable, accounting answers
    local d state
    for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1)
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    sacct -n -X -S now >/dev/null 2>&1 || return 1
}

summary() {
    local d
    echo "megalite test SLURM is up in $DIR (node $NODE, $CPUS CPUs, partitions debug*/high," \
        "account $ACCOUNT)"
    for d in "${DAEMONS[@]}"; do
        printf '  %-10s pid %-7s log %s\n' "$d" "$(pid_of "$d")" "$DIR/log/$d.log"
    done
    echo "client environment: export SLURM_CONF=$DIR/slurm.conf" \
        "  (or: source $HERE/env.sh $DIR)"
}

export SLURM_CONF=$DIR/slurm.conf

# Serialize concurrent starts/stops of the same DIR; stop.sh, called below, sees we hold it.
exec 9>>"$DIR/.lock"
flock 9
export _MEGALITE_SLURM_LOCKED=$DIR

ensure_packages
WANT_SLURM=$(slurm_conf)
WANT_DBD=$(slurmdbd_conf)

any_alive=0
for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null && any_alive=1; done
if ((any_alive)); then
    if [[ $(cat "$DIR/slurm.conf" 2>/dev/null) != "$WANT_SLURM" ||
        $(cat "$DIR/slurmdbd.conf" 2>/dev/null) != "$WANT_DBD" ]]; then
        say "running with another configuration: stopping it and starting again"
    elif ! healthy; then
        say "half up or unhealthy: stopping it and starting again"
    else
        say "already up and healthy ($(elapsed) s)"
        summary
        exit 0
    fi
    "$HERE/stop.sh" "$DIR" >&2
fi

# --- fresh start: nothing of ours is running ---------------------------------------------------
touch "$DIR/.megalite-testcluster" # marks DIR as ours, so that stop.sh --purge may delete it
mkdir -p "$DIR"/{run,log,state,spool,tmp,munge,munge-socket,mariadb}
chmod 0755 "$DIR" "$DIR/munge-socket"
chmod 0700 "$DIR/munge" "$DIR/mariadb"
rm -f "$DIR"/run/*.pid "$DB_SOCKET" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
printf '%s\n' "$WANT_SLURM" >"$DIR/slurm.conf"
(umask 077 && printf '%s\n' "$WANT_DBD" >"$DIR/slurmdbd.conf")
chmod 600 "$DIR/slurmdbd.conf"

for p in $PORT $((PORT + 1)) $((PORT + 2)) $DB_PORT; do
    if ss -Hltn "sport = :$p" | grep -q .; then
        die "port $p on this machine is taken (set MEGALITE_SLURM_PORT): $(ss -Hltnp "sport = :$p")"
    fi
done

# munge: its own key, socket, pid, log and seed files.
if [[ ! -s $DIR/munge/munge.key ]]; then
    (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
fi
chmod 0400 "$DIR/munge/munge.key"
spawn munged munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" || die "munged failed to start" munged
munge_ok() { munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET"; }
wait_for 10 munged "munge to encode and decode a credential" munge_ok

# MariaDB: own datadir, TCP on 127.0.0.1 only, socket for our own setup queries.
if [[ ! -d $DIR/mariadb/mysql ]]; then
    say "initializing the MariaDB datadir"
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/mariadb" --skip-test-db \
        --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed" mariadb-install
fi
spawn --bg mariadbd setsid mariadbd --no-defaults --user=root --datadir="$DIR/mariadb" \
    --socket="$DB_SOCKET" --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
    --tmpdir="$DIR/tmp" --performance-schema=OFF --max-connections=64 \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=2 --innodb-doublewrite=0
sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -N -B -e "$1"; }
wait_for 60 mariadbd "MariaDB to answer on $DB_SOCKET" sql "SELECT 1"
sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "MariaDB user setup failed"

# slurmdbd finds slurmdbd.conf next to \$SLURM_CONF; it creates its tables on first start.
spawn slurmdbd slurmdbd || die "slurmdbd failed to start" slurmdbd
wait_for 90 slurmdbd "slurmdbd to answer (sacctmgr)" sacctmgr -n show cluster

# Accounting: the cluster, the account 'megalite' with root in it (root keeps its default account).
if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed" slurmdbd
fi
if [[ -z $(sacctmgr -n -P show account "$ACCOUNT" format=account) ]]; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="megalite tests" \
        organization=megalite >/dev/null || die "sacctmgr add account failed" slurmdbd
fi
if [[ -z $(sacctmgr -n -P show assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=user) ]]; then
    sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null ||
        die "sacctmgr add user failed" slurmdbd
fi

spawn slurmctld slurmctld -f "$DIR/slurm.conf" || die "slurmctld failed to start" slurmctld
ctld_up() { scontrol ping | grep -q 'is UP'; }
wait_for 30 slurmctld "slurmctld to answer (scontrol ping)" ctld_up
spawn slurmd slurmd -f "$DIR/slurm.conf" -N "$NODE" || die "slurmd failed to start" slurmd
node_idle() { [[ $(sinfo -h -n "$NODE" -o %T) =~ ^(idle|mixed|allocated)$ ]]; }
wait_for 30 slurmd "node $NODE to become idle" node_idle
wait_for 30 slurmdbd "sacct to answer" sacct -n -X -S now
healthy || die "started, but the health check fails (see $DIR/log/)"

say "started in $(elapsed) s"
summary
