# syntax=docker/dockerfile:1
#
# One image for every orch process: `orch worker` (the default), `orch coordinator`,
# and one-off commands such as `orch submit /app/example.py` or `orch status RUN_ID`.
# Workflow code lives in /app; workers import it with `orch worker --path /app`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the project (the `orch` console script and its dependencies) from the copied
# source (.dockerignore keeps .git, caches and virtualenvs out), then drop the source:
# the installed package is all the image needs.
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . \
    && rm -rf /src

# An unprivileged user runs every orch process; /app (its home) holds the workflow code.
RUN groupadd --system --gid 1000 orch \
    && useradd --system --uid 1000 --gid orch --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin orch \
    && install -d -o orch -g orch /app

WORKDIR /app
COPY --chown=orch:orch example.py ./

USER orch

# Needs ORCH_REDIS_URL (or --redis-url); override the command for the other roles.
CMD ["orch", "worker"]
