# syntax=docker/dockerfile:1
# runner-daemon, Opik's local runner, as a container image.
#
#   docker build -t runner-daemon .
#   docker run --stop-timeout 45 \
#       -e OPIK_URL_OVERRIDE=https://www.comet.com/opik/api/ -e OPIK_API_KEY -e OPIK_WORKSPACE \
#       -e RUNNER_DAEMON_RUNNER_ID=<runner id from `runner-daemon pair`> \
#       -e RUNNER_DAEMON_BRIDGE_KEY_FILE=/run/secrets/bridge-key \
#       -v "$PWD/bridge-key:/run/secrets/bridge-key:ro" \
#       -v "$PWD/my-project:/workspace" \
#       runner-daemon
#
# tini is the ENTRYPOINT, PID 1: the daemon reaps the Exec commands it starts, but a
#   grandchild orphaned by one of them (`cmd &` in a shell that exits) is re-parented to
#   PID 1, and only an init reaps those; without one they stay zombies until the container
#   stops. tini passes SIGTERM on to the daemon (which drains, then exits 0) and exits with
#   its status. No `--init` is needed, here or on Kubernetes (which has none); with --init
#   anyway, Docker's init is PID 1 and this tini, a subreaper (TINI_SUBREAPER), still reaps.
# --stop-timeout 45: Docker's default 10 s would SIGKILL a drain (up to 20 s of
#   shutdown_grace_seconds plus final reports).
# The bridge key file must be readable by uid 10001; /workspace must be writable by it
#   (`chown -R 10001:10001 my-project`, or run with --user "$(id -u):$(id -g)").

# The base image, pinned by digest so that every build starts from the same bytes:
# python:3.11-slim's multi-platform index of 2026-08-05 (Python 3.11.15 on Debian 13),
# as docker-library/repo-info records it (repos/python/remote/3.11-slim.md). To move to a
# newer one (security fixes), take the "Digest:" line of
#   docker buildx imagetools inspect python:3.11-slim
# and replace the digest below, or build with --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff

# --- build: a wheel of the project, installed with its dependencies into a venv -------------
FROM ${PYTHON_IMAGE} AS build
# Extras to install: "syntax" adds JavaScript/TypeScript syntax checks (tree-sitter, binary
# wheels); "" for none. devserver and qr are of no use in a container.
ARG EXTRAS=syntax
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# constraints.txt pins every runtime dependency (and the syntax extra's) to one version;
# tests/test_ops_files.py keeps it complete and checks that pip resolves it.
COPY pyproject.toml README.md constraints.txt ./
COPY runner_daemon ./runner_daemon
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/runner-daemon \
    && wheel="$(echo /wheels/runner_daemon-*.whl)" \
    && /opt/runner-daemon/bin/pip install --constraint constraints.txt "${wheel}${EXTRAS:+[$EXTRAS]}" \
    && /opt/runner-daemon/bin/pip uninstall -y pip setuptools \
    && /opt/runner-daemon/bin/runner-daemon --version

# --- runtime --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# git: SearchFiles runs `git grep` in a git work tree, and Exec commands use it. bash (already
# in the base image) runs every Exec command. tini: the init, PID 1 (see above).
# Versions are not pinned: they come from the base image's Debian release, and security
# updates should land on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git bash tini \
    && rm -rf /var/lib/apt/lists/*
# --no-log-init: no lastlog/faillog entries (sparse files that grow with a large uid).
RUN groupadd --gid 10001 runner \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/runner \
        --shell /bin/bash runner \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/runner-daemon \
    && install -d -o 10001 -g 10001 -m 0755 /workspace
COPY --from=build /opt/runner-daemon /opt/runner-daemon
# On PATH through a link, not by putting the venv's bin first: an Exec command's `python`
# or `pip` stays the image's own, not the daemon's venv.
RUN ln -s /opt/runner-daemon/bin/runner-daemon /usr/local/bin/runner-daemon

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RUNNER_DAEMON_LOG_FORMAT=json \
    RUNNER_DAEMON_STATE_DIRECTORY=/var/lib/runner-daemon \
    RUNNER_DAEMON_WORKSPACE_ROOT=/workspace \
    RUNNER_DAEMON_HEALTH__LISTEN=127.0.0.1:9464 \
    TINI_SUBREAPER=1

USER 10001:10001
WORKDIR /workspace
# The daemon drains on SIGTERM (stops polling, lets commands finish, reports) and exits 0.
STOPSIGNAL SIGTERM
# /healthz on the listener above: alive and the loop moving (an Opik outage alone does not
# make it unhealthy; `runner-daemon health --ready` would). Unset RUNNER_DAEMON_HEALTH__LISTEN
# and this check fails: override it with --no-healthcheck then.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["runner-daemon", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "runner-daemon"]
CMD ["run"]
