#!/usr/bin/env bash
# N processes of one data-parallel job on this machine (CPU devices, gloo collectives), e.g. to
# try multi-host training without a cluster:
#   bash launch/multiprocess.sh 2 --config=configs/qqp.py:smoke --workdir=/tmp/sharcs_mp
# Each process owns DEVICES_PER_PROCESS simulated CPU devices (default 1); the global batch
# (config.train.batch_size) is split over all of them. Logs: WORKDIR/process<i>.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
count="${1:?usage: multiprocess.sh NUM_PROCESSES [main.py flags...]}"; shift
bash "$root/launch/install.sh"
if [[ -z "${SHARCS_DATA_DIR:-}" && -d "$root/../shared/data/glue" ]]; then
  export SHARCS_DATA_DIR="$(cd "$root/../shared/data/glue" && pwd)"
fi
workdir="$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p' | tail -1)"
[[ -n "$workdir" ]] || { echo "multiprocess.sh: pass --workdir=DIR" >&2; exit 2; }
mkdir -p "$workdir"
port="${SHARCS_COORDINATOR_PORT:-$(( 20000 + RANDOM % 20000 ))}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
cd "$root"
pids=()
for ((i = 0; i < count; i++)); do
  "${SHARCS_VENV:-$root/.venv}/bin/python" -m sharcs_jax.main "$@" \
      --coordinator_address="localhost:$port" --num_processes="$count" --process_id="$i" \
      > "$workdir/process$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=$?; echo "process $i failed: see $workdir/process$i.log" >&2; }
done
[[ $status -eq 0 ]] && cat "$workdir/report.md"
exit $status
