#!/usr/bin/env bash
# Set up genflow in .venv: CPU torch first, then the project with every extra (all) and the dev tools,
# then the tiny offline models. System packages for the sandbox (bubblewrap) and
# the report's browser test (chromium) are installed when apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ "${GENFLOW_SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    echo "==> installing system packages: ${missing[*]}"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
      echo "warning: could not install ${missing[*]}; code runs without namespace isolation and the browser test is skipped" >&2
    fi
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a CUDA build of several GB.
echo "==> installing torch (CPU)"
$PIP install -q "torch==2.13.0"
echo "==> installing genflow with every plugin family and the dev tools"
$PIP install -q -e ".[all,dev]"
echo "==> writing tiny offline models to models/"
HF_HUB_OFFLINE=1 "$VENV/bin/genflow" models init-tiny models
