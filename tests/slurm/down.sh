#!/usr/bin/env bash
# Stop the daemons tests/slurm/up.sh started, by the PIDs it recorded in $SLURM_CI_RUN:
#   SLURM_CI_RUN=<same scratch dir> tests/slurm/down.sh
# SIGTERM, up to 10 s per daemon, then SIGKILL. Packages and /etc/slurm stay (the next up.sh
# reuses them). Safe to run twice or after a failed up.sh.
set -euo pipefail
RUN="${SLURM_CI_RUN:?set SLURM_CI_RUN to a scratch dir for pid and log files}"
for name in slurmd slurmctld munged; do
  f="$RUN/$name.pid"
  [ -f "$f" ] || continue
  pid="$(cat "$f")"
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "down.sh: $name ($pid) ignored SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
done
