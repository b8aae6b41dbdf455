#!/usr/bin/env bash
# A one-node Slurm on this machine for CI (tests/test_slurm.py): Debian's slurm-wlm and munge,
# a minimal /etc/slurm/slurm.conf for this host, munged + slurmctld + slurmd started as plain
# daemons (no systemd needed). Run as root; safe to re-run while the daemons are up.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

node=$(hostname -s)
pid_of() { # the daemon's pid from its pid file, if that process is still the daemon
  local pid
  pid=$(cat "/run/$1.pid" 2>/dev/null) && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}

# munge: a key (the Debian package usually makes one), then the daemon as user munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  sleep 1
  munge -n </dev/null | unmunge >/dev/null
fi

# slurm.conf: the node as `slurmd -C` sees it; everything talks over 127.0.0.1. Process tracking
# and tasks without cgroups (containers often have none to give), no accounting. A requeued job
# may start again after 10 s (cred_expire; Slurm's default holds it 120 s) and the scheduler
# looks every 5 s (default 60 s, backfill 30 s), so the requeue tests take minutes, not ten.
install -d -o slurm -g slurm /var/spool/slurmctld /var/log/slurm
install -d /var/spool/slurmd /etc/slurm
conf=$(mktemp)
cat >"$conf" <<EOF
ClusterName=tltune-ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
DisableRootJobs=NO
$(slurmd -C | head -n1) NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
restart=0
if ! cmp -s "$conf" /etc/slurm/slurm.conf; then
  install -m 644 "$conf" /etc/slurm/slurm.conf
  restart=1
fi
rm -f "$conf"

for daemon in slurmctld slurmd; do
  if [ "$restart" = 1 ] && pid=$(pid_of $daemon); then
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
  fi
  pid_of $daemon >/dev/null || "/usr/sbin/$daemon"
done

for _ in $(seq 60); do
  state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
  case "$state" in
    idle | mix | alloc | comp) sinfo; exit 0 ;;
  esac
  sleep 1
done
echo "slurm node $node not up (state: '${state:-none}'); see /var/log/slurm/" >&2
exit 1
