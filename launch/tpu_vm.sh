#!/usr/bin/env bash
# Template: data-parallel SHARCS training on a Cloud TPU VM slice, one process per host.
# jax.distributed detects the slice's hosts itself. From your workstation:
#   TPU=my-tpu ZONE=us-central2-b WORKDIR=gs://bucket/sharcs/qqp bash launch/tpu_vm.sh
# The workdir must be shared by all hosts (a GCS bucket: orbax writes there directly).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
config="${CONFIG:-configs/qqp.py}"
repo="${REPO_URL:?set REPO_URL to this repository}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d sharcs_jax ] || git clone '$repo' sharcs_jax
  cd sharcs_jax && bash launch/install.sh
  .venv/bin/pip install -q -U 'jax[tpu]'
  .venv/bin/python -m sharcs_jax.main --config='$config' --workdir='$WORKDIR' --distributed"
