#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the sweep tests (`make slurm-up`/`slurm-down`).
#
#   tests/slurm/slurm-local.sh start    install (Debian packages) if needed, configure, start, wait until idle
#   tests/slurm/slurm-local.sh stop     stop slurmd, slurmctld and munged
#   tests/slurm/slurm-local.sh status   print the daemons and `sinfo`; exit 0 only if the node is usable
#
# Needs root (packages, /etc/slurm, daemons). Safe to call twice: a running, healthy cluster is left
# alone. There is no systemd here, so the daemons are started directly. The cluster: one node named
# after this host with all its CPUs and memory, partition `debug`, proctrack/linuxproc, task/none,
# no accounting (so no sacct: callers must never wait on accounting), requeue allowed.
#
# It refuses to overwrite an /etc/slurm/slurm.conf it did not write (set SLURM_LOCAL_FORCE=1 to
# replace it; the old file is kept as slurm.conf.bak).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by dit-harness tests/slurm/slurm-local.sh"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm-local
PACKAGES=(slurmctld slurmd slurm-client munge)
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (packages, /etc/slurm and the daemons need it)"
}

install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Keep the packages' maintainer scripts from starting the daemons (unconfigured, and there may be
    # no init system): Debian's policy-rc.d convention, only while installing and only if none exists.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || { [ $own_policy = 1 ] && rm -f "$policy"; die "apt-get install ${missing[*]} failed"; }
    [ $own_policy = 1 ] && rm -f "$policy"
    return 0
}

node_name() {
    local name
    name=$(hostname -s 2>/dev/null || true)
    echo "${name:-localhost}"
}

write_munge_key() {
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
    if [ ! -s "$key" ]; then
        say "creating a munge key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force
        else
            dd if=/dev/urandom bs=1 count=1024 of="$key" status=none
        fi
    fi
    chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
    chmod 0700 /etc/munge
    chmod 0400 "$key"
}

write_slurm_conf() {
    local node cpus mem_mb
    node=$(node_name)
    cpus=$(nproc)
    # RealMemory a little under MemTotal: slurmd drains a node that reports less than configured.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        [ "${SLURM_LOCAL_FORCE:-0}" = 1 ] || die "$CONF exists and was not written by this script; set SLURM_LOCAL_FORCE=1 to replace it"
        cp "$CONF" "$CONF.bak"
        say "kept the previous $CONF as $CONF.bak"
    fi
    mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
    local tmp
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
$MARKER
ClusterName=harness-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credential lifetime; it is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Preempted or timed-out jobs requeue themselves (scontrol requeue) and run again once cred_expire has passed.
JobRequeue=1
# Short timeouts: tests start, signal and cancel jobs within seconds.
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
InactiveLimit=0
KillWait=5
WaitTime=0
MinJobAge=300
# Schedule pending (e.g. requeued) jobs within seconds, not the default minute.
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1  # unchanged
    fi
    mv "$tmp" "$CONF"
    return 0  # changed
}

pid_alive() {  # pid_alive PIDFILE NAME
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null || true)
    [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q "$2" "/proc/$pid/comm" 2>/dev/null
}

MUNGE_PID=/run/munge/munged.pid

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

stop_daemon() {  # stop_daemon PIDFILE NAME: the process in the pid file, if it is that daemon
    local pidfile=$1 name=$2 pid
    pid_alive "$pidfile" "$name" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

start_munge() {
    pid_alive "$MUNGE_PID" munged && munge_works && return 0
    stop_daemon "$MUNGE_PID" munged
    say "starting munged"
    # --force: a stale socket left by a killed munged must not stop it.
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 1 50); do
        munge_works && return 0
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

node_state() {
    sinfo -h -N -n "$(node_name)" -o '%t' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'
}

wait_for_idle() {
    local deadline=$((SECONDS + WAIT_S)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(node_state || true)
        case "$state" in
            idle|mix|alloc|comp) return 0 ;;
            drain|drng|down)
                # A node left down or drained by an earlier run: tell slurmctld it is fine now.
                scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    say "sinfo after ${WAIT_S}s:"
    sinfo -N -l >&2 || true
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 2>/dev/null || true
    die "the node did not become idle within ${WAIT_S}s (state: ${state:-unknown})"
}

healthy() {
    pid_alive "$RUN/slurmctld.pid" slurmctld && pid_alive "$RUN/slurmd.pid" slurmd &&
        case "$(node_state || true)" in idle|mix|alloc|comp) true ;; *) false ;; esac
}

start() {
    # Without root, a healthy cluster this script configured is all there is to check.
    if [ "$(id -u)" -ne 0 ] && [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF" && command -v sinfo >/dev/null && healthy; then
        say "already running: $(sinfo -h -o '%P %D %t %C' | head -n1)"
        return 0
    fi
    need_root
    install_packages
    write_munge_key
    local changed=0
    write_slurm_conf && changed=1
    start_munge
    if [ $changed = 0 ] && healthy; then
        say "already running: $(sinfo -h -o '%P %D %t %C' | head -n1)"
        return 0
    fi
    if [ $changed = 1 ]; then
        # A new configuration: restart the daemons so they read it.
        stop_daemon "$RUN/slurmd.pid" slurmd
        stop_daemon "$RUN/slurmctld.pid" slurmctld
    fi
    if ! pid_alive "$RUN/slurmctld.pid" slurmctld; then
        say "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! pid_alive "$RUN/slurmd.pid" slurmd; then
        say "starting slurmd"
        /usr/sbin/slurmd -N "$(node_name)"   # the node name of slurm.conf, whatever gethostname() says
    fi
    wait_for_idle
    say "ready: $(sinfo -h -o 'partition %P, %D node, state %t, CPUs (A/I/O/T) %C' | head -n1)"
}

stop() {
    need_root
    stop_daemon "$RUN/slurmd.pid" slurmd
    stop_daemon "$RUN/slurmctld.pid" slurmctld
    stop_daemon "$MUNGE_PID" munged
    say "stopped"
}

status() {
    local ok=0
    for entry in "$MUNGE_PID munged" "$RUN/slurmctld.pid slurmctld" "$RUN/slurmd.pid slurmd"; do
        set -- $entry
        if pid_alive "$1" "$2"; then echo "$2: running"; else echo "$2: stopped"; ok=1; fi
    done
    command -v sinfo >/dev/null && sinfo -N -l 2>&1 || ok=1
    healthy || ok=1
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
