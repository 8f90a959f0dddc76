# syntax=docker/dockerfile:1
# salestrainer-sidecar as a container: the same `sidecar run` daemon the systemd unit runs.
#
#   docker build -t salestrainer-sidecar .                          # OpenAI transcription only
#   docker build -t salestrainer-sidecar --build-arg EXTRAS=local . # + faster-whisper (large image)
#   docker run --env-file prod.env -p 127.0.0.1:9002:9002 --stop-timeout 120 salestrainer-sidecar
#
# No configuration or secret is baked in: every setting comes from the environment at run time
# (see .env.example). Give the container a stop timeout above SHUTDOWN_GRACE (60 s): Docker's default
# of 10 s would SIGKILL in-flight jobs (they are then redelivered by SQS, not lost).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: a self-contained virtualenv in /opt/venv with the project installed (not editable)
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer ./consumer
# EXTRAS: optional dependency groups of pyproject.toml, e.g. "local" for the offline Whisper backend.
ARG EXTRAS=""
RUN /opt/venv/bin/pip install --no-cache-dir "/src${EXTRAS:+[$EXTRAS]}" \
    && /opt/venv/bin/sidecar --version

# ---- runtime: slim Python, the virtualenv, an unprivileged user
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 salestrainer \
    && useradd --system --uid 10001 --gid salestrainer --home-dir /home/salestrainer --create-home \
       --shell /usr/sbin/nologin salestrainer
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9002 \
    LOG_FORMAT=json
# An empty working directory: the daemon reads ./.env if present, and there is none in the image.
WORKDIR /home/salestrainer
USER 10001:10001
EXPOSE 9002
# /health is 200 while the poll loop makes progress, 503 when it stalled (slim has no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('METRICS_PORT', '9002'), timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["sidecar", "run"]
