# syntax=docker/dockerfile:1
# The trainer and the generation server: torch (CUDA 13.0 wheels), Lightning, transformers and
# vLLM (`pip install .[train,vllm]`). One image for both, so the trainer and the servers it
# pushes weights to always run the same code and the same torch.
#   docker build -f deploy/trainer.Dockerfile -t rpp-trainer:0.1.0 .        # from the repository root
#   docker run --rm --gpus 1 -p 50061:50061 -v /models:/models:ro rpp-trainer:0.1.0   # a vLLM server
#   docker run --rm --gpus all --shm-size 16g rpp-trainer:0.1.0 \
#       torchrun --nproc_per_node 8 -m rpp_lightning.cli fit --config /etc/rpp/trainer.yaml
# The process named in CMD (or the command you give) is PID 1 (exec form): SIGTERM reaches the
# server, which drains, or torchrun, which stops its workers.
# vLLM pins torch; 0.32.0 pins torch 2.13.0, the torch the test suite runs (and the version of
# vLLM's CPU build the CI tests). The CUDA wheels bring their own CUDA libraries: the base only
# needs to match the driver (CUDA 13.0: NVIDIA driver >= 580).

FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rpp_lightning rpp_lightning
COPY reward_servers reward_servers
COPY deploy/locks/trainer.txt /tmp/lock.txt
RUN pip install -c /tmp/lock.txt ".[train,vllm]"

FROM nvidia/cuda:13.0.0-base-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
# gcc, libc headers and Python.h: Triton and torch.compile (vLLM's CUDA graphs) build small
# launchers at run time. The apt versions follow the pinned base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 gcc libc6-dev python3.12-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin rpp
COPY --from=build /opt/venv /opt/venv
COPY --chmod=755 deploy/rpp_health.py /usr/local/bin/rpp-health
# The quickstart's policy, tokenizer, data and configs, so `deploy/compose.yaml` runs as is;
# runs/ belongs to the user the processes run as (checkpoints, logs, the exported policy).
WORKDIR /workspace
COPY --chown=10001:10001 configs configs
COPY --chown=10001:10001 assets assets
COPY --chown=10001:10001 data/arithmetic data/arithmetic
RUN mkdir -p /workspace/runs && chown 10001:10001 /workspace/runs
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf
USER 10001:10001
EXPOSE 50061 29500
CMD ["rpp-generation-server", "--backend", "vllm", "--model", "/models/policy", "--host", "0.0.0.0", "--port", "50061"]
