#!/usr/bin/env bash
# Container entrypoint on a Hugging Face Space: keep the model cache on persistent storage when
# the Space has it (/data), so a restart does not download the weights again; then run the app.
set -euo pipefail
if [ -d /data ] && [ -w /data ]; then
  export HF_HOME=${HF_HOME:-/data/.huggingface}
else
  echo "prefloop: no persistent storage (/data): votes survive a restart only through the Hub dataset" >&2
fi
exec "$@"
