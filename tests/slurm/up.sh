#!/usr/bin/env bash
# Bring up a throwaway single-node SLURM on localhost for tests/test_slurm.py (run as root):
#   SLURM_CI_RUN=<scratch dir> tests/slurm/up.sh      stop it with tests/slurm/down.sh
# - Debian's slurm-wlm + munge, installed with apt only when missing.
# - No systemd: munged, slurmctld and slurmd run as foreground processes started here; their
#   PIDs go to $SLURM_CI_RUN/<name>.pid (down.sh stops exactly those), their output to <name>.log.
# - No accounting (no slurmdbd): Snakemake's SLURM plugin needs `slurm-status-command: squeue`,
#   its sacct default would poll forever.
# - One FAKE GPU (gres gpu:1 backed by /dev/null) so that jobs asking for gpu=1 get scheduled and
#   see CUDA_VISIBLE_DEVICES; a TaskProlog prints that variable into each job's log.
# - Writes /etc/slurm/{slurm,gres}.conf; refuses to touch a SLURM config this script did not write.
set -euo pipefail
RUN="${SLURM_CI_RUN:?set SLURM_CI_RUN to a scratch dir for pid and log files}"
MARK="# written by quantsweep tests/slurm/up.sh"
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  echo "up.sh: needs root (installs packages, writes /etc/slurm, starts daemons)" >&2
  exit 2
fi
if [ -e /etc/slurm/slurm.conf ] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
  echo "up.sh: /etc/slurm/slurm.conf exists and was not written by this script; not touching it" >&2
  exit 2
fi

installed() {  # installed PKG: true if dpkg has PKG fully installed
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}
missing=()
for pkg in slurm-wlm munge; do
  installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "up.sh: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if scontrol ping >/dev/null 2>&1; then
  echo "up.sh: a slurmctld already answers (earlier run not stopped?); stop it first" >&2
  exit 2
fi

mkdir -p "$RUN" /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/munge
chown munge:munge /run/munge
# the munge package creates /etc/munge/munge.key on install; recreate only if missing
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
fi

# CPUs the node offers (nproc would honour OMP_NUM_THREADS); memory below what slurmd detects
CPUS="$(getconf _NPROCESSORS_ONLN)"
MEM="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"  # MiB

cat > /etc/slurm/task_prolog.sh <<'EOF'
#!/bin/sh
# "print ..." lines of a TaskProlog go to the task's stdout, i.e. the job's log
echo "print slurm-task-prolog: job=${SLURM_JOB_ID:-} step=${SLURM_STEP_ID:-} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
EOF
chmod 755 /etc/slurm/task_prolog.sh

cat > /etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskProlog=/etc/slurm/task_prolog.sh
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# reject at submission what the node cannot run (else such a job pends forever)
EnforcePartLimits=ALL
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue/scontrol for an hour (the squeue status command needs
# at least 3x slurm-init-seconds-before-status-checks; the test reads them after the run)
MinJobAge=3600
KillWait=5
SlurmdTimeout=30
GresTypes=gpu
NodeName=localhost CPUs=$CPUS RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
# one FAKE GPU (no device behind it); without File= slurmd reports 0 GPUs and the node goes INVAL
printf 'AutoDetect=off\nNodeName=localhost Name=gpu File=/dev/null\n' > /etc/slurm/gres.conf

start() {  # start NAME CMD...: background process whose PID is the daemon's own (exec in a subshell)
  local name="$1"
  shift
  ( exec "$@" ) > "$RUN/$name.log" 2>&1 &
  echo "$!" > "$RUN/$name.pid"
}
wait_for() {  # wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds
  local t="$1"
  shift
  local i
  for i in $(seq "$((t * 5))"); do
    if "$@" > /dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "up.sh: timeout waiting for: $*" >&2
  return 1
}

if munge -n 2>/dev/null | unmunge > /dev/null 2>&1; then
  echo "up.sh: using the munged that is already running"
else
  start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
  wait_for 10 bash -c 'munge -n | unmunge'
fi

start slurmctld /usr/sbin/slurmctld -D -c -i  # -c: forget state (drained node, jobs) of earlier runs
wait_for 30 scontrol ping
start slurmd /usr/sbin/slurmd -D -N localhost
wait_for 30 bash -c '[ "$(sinfo -h -n localhost -o %T)" = idle ]'
srun -t 1 hostname > /dev/null
echo "slurm up: $(sinfo -h -o '%P %D %T %c cpus %m MB %G')"
