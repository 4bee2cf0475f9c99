#!/usr/bin/env bash
# The GPU check as one command on a GPU machine without network access (e.g. a lent H100/H200):
# Python dependencies and ztlab itself travel as wheels in .whl/, bubblewrap as a Debian
# package in .deb/
# (prepare both with `make gpu-check-bundle`). On a machine with the project's venv, run
# `make gpu-check` instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ztlab-site .whl/*.whl
# ztlab comes from its wheel; the checkout is on the path only for the tests package
export PYTHONPATH="/tmp/ztlab-site:$PWD"
if ! command -v bwrap >/dev/null; then
  dpkg -x .deb/bubblewrap_*.deb /tmp/ztlab-bwrap
  export ZTLAB_BWRAP=/tmp/ztlab-bwrap/usr/bin/bwrap
fi
{ nvidia-smi -L; uname -r; grep cgroup /proc/self/mounts | head -3; } | tee "$out/gpu-check.log"
timeout 420 python3 -m pytest -p no:cacheprovider -q -s -rs -m gpu tests/gpu 2>&1 | tee -a "$out/gpu-check.log"
