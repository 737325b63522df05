# syntax=docker/dockerfile:1
# The preference (reward model) server: torch + transformers (`pip install .[preference]`).
# CPU by default: torch comes from the PyTorch CPU index (~190 MB instead of ~3 GB of CUDA
# wheels). For a GPU reward model build with the CUDA variant, e.g.
#   docker build -f deploy/preference.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 \
#       -t rpp-preference:0.1.0-cu130 .
# (the CUDA wheels bring their own CUDA libraries; the host needs the NVIDIA container toolkit).
#   docker run --rm -p 50052:50052 -v /models/rm:/models/rm:ro -e RPP_TOKEN=... rpp-preference:0.1.0 \
#       --model /models/rm --host 0.0.0.0 --port 50052 --token-env RPP_TOKEN
# The server is PID 1 (exec form): SIGTERM reaches it and it drains.

FROM python:3.12.11-slim-bookworm AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index: `.[preference]` then finds it installed and keeps it
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rpp_lightning rpp_lightning
COPY reward_servers reward_servers
COPY deploy/locks/preference.txt /tmp/lock.txt
RUN pip install -c /tmp/lock.txt ".[preference]"

FROM python:3.12.11-slim-bookworm
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin rpp
COPY --from=build /opt/venv /opt/venv
COPY --chmod=755 deploy/rpp_health.py /usr/local/bin/rpp-health
# models are local directories: never reach for the Hugging Face hub
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf
USER 10001:10001
WORKDIR /tmp
EXPOSE 50052
ENTRYPOINT ["rpp-reward-server", "preference"]
CMD ["--model", "/models/reward", "--host", "0.0.0.0", "--port", "50052"]
