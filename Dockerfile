# PrefLoop as a Hugging Face Space (Docker SDK) on one CUDA GPU; see "Run it as a Hugging Face
# Space" in README.md. The README's front matter sets app_port 7860 and hf_oauth: true.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Spaces run the container as user 1000; everything it writes lives under its home or /data.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user VIRTUAL_ENV=/home/user/venv PATH=/home/user/venv/bin:$PATH
RUN python3 -m venv $VIRTUAL_ENV
WORKDIR /home/user/app

# Dependencies first (a layer that survives code edits): torch, then the CUDA build of vLLM and
# the exact pins of requirements.txt, the same files `make install` uses.
COPY --chown=user requirements.txt requirements-cuda.txt ./
RUN pip install torch==2.13.0 && pip install -r requirements-cuda.txt

COPY --chown=user . .
# PrefLoop itself (registers its vLLM plugin entry point; the plugin only touches vLLM's CPU ops).
RUN pip install --no-deps --no-build-isolation -e .

# Secrets (Space settings): HF_TOKEN (write access to the dataset repo, read access to the model).
# Variables: PREFLOOP_HUB_DATASET (e.g. you/prefloop-votes), PREFLOOP_ADMINS (HF user names;
# default: the Space's owner). With persistent storage, data lives in /data/prefloop and model
# weights are cached in /data/.huggingface, so a restart or rebuild keeps every vote and adapter.
EXPOSE 7860
ENTRYPOINT ["bash", "scripts/space-entrypoint.sh"]
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
