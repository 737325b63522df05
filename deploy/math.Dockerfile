# syntax=docker/dockerfile:1
# The math-verifier reward server: grpcio + math-verify, no torch (`pip install .[math]`).
#   docker build -f deploy/math.Dockerfile -t rpp-math:0.1.0 .          # from the repository root
#   docker run --rm -p 50051:50051 -e RPP_TOKEN=... rpp-math:0.1.0 \
#       math --host 0.0.0.0 --port 50051 --verifier-args workers=4 --token-env RPP_TOKEN
# The server is PID 1 (exec form): `docker stop` / a pod's SIGTERM reaches it and it drains.
# Pin the base by digest for reproducible builds: docker buildx imagetools inspect <tag>.

FROM python:3.12.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rpp_lightning rpp_lightning
COPY reward_servers reward_servers
COPY deploy/locks/math.txt /tmp/lock.txt
# the project as a wheel (not editable: no sources stay), every dependency at its locked version
RUN pip install -c /tmp/lock.txt ".[math]"

FROM python:3.12.11-slim-bookworm
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin rpp
COPY --from=build /opt/venv /opt/venv
COPY --chmod=755 deploy/rpp_health.py /usr/local/bin/rpp-health
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
ENTRYPOINT ["rpp-reward-server"]
CMD ["math", "--host", "0.0.0.0", "--port", "50051", "--verifier-args", "workers=4", "timeout_s=10"]
