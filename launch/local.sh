#!/usr/bin/env bash
# Runs the main job on this machine, installing what it needs first (idempotent).
#   bash launch/local.sh --config=configs/qqp.py --workdir=/tmp/sharcs_qqp
# Real GLUE files are read from $SHARCS_DATA_DIR; it defaults to ../shared/data/glue beside
# the checkout when that exists, else the tasks load from the Hugging Face hub.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/install.sh"
if [[ -z "${SHARCS_DATA_DIR:-}" && -d "$root/../shared/data/glue" ]]; then
  export SHARCS_DATA_DIR="$(cd "$root/../shared/data/glue" && pwd)"
fi
cd "$root"
exec "${SHARCS_VENV:-$root/.venv}/bin/python" -m sharcs_jax.main "$@"
