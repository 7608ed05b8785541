# PrefLoop as a Hugging Face Space (Docker SDK) on one CUDA GPU; see "Deploy as a Hugging Face
# Space" in README.md. The README's front matter sets app_port 7860 and hf_oauth: true.
#
# The project's Python (pyproject.toml: >=3.11,<3.12) from the official image. torch's and vLLM's
# CUDA wheels from PyPI bring their own CUDA libraries: no CUDA base image is needed, only the
# host's driver. gcc stays in the image: Triton compiles small helpers at run time.
FROM python:3.11-slim

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Spaces run the container as user 1000; everything it writes lives under its home or /data.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user VIRTUAL_ENV=/home/user/venv PATH=/home/user/venv/bin:$PATH
RUN python -m venv $VIRTUAL_ENV
WORKDIR /home/user/app

# Dependencies first (a layer that survives code edits), every pin read from pyproject.toml: torch
# on its own, then the runtime pins and the CUDA engine (vllm).
COPY --chown=user pyproject.toml ./
COPY --chown=user scripts/requirements.py scripts/
RUN pip install "$(python scripts/requirements.py --only torch)" \
 && python scripts/requirements.py cuda > /tmp/requirements-cuda.txt \
 && pip install -r /tmp/requirements-cuda.txt

COPY --chown=user . .
# PrefLoop itself (registers its vLLM plugin entry point).
RUN pip install --no-deps --no-build-isolation -e .

# Secrets (Space settings): HF_TOKEN (read access to the model, write access to the dataset and
# model repos). Variables: PREFLOOP_HUB_DATASET, PREFLOOP_HUB_MODEL, PREFLOOP_ADMINS,
# PREFLOOP_ANNOTATORS. With persistent storage, data lives in /data/prefloop and model weights are
# cached in /data/.huggingface, so a restart or rebuild keeps every vote and adapter.
EXPOSE 7860
ENTRYPOINT ["bash", "scripts/space-entrypoint.sh"]
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
