# syntax=docker/dockerfile:1
# runner-daemon, Opik's local runner, as a container image.
#
#   docker build -t runner-daemon .
#   docker run --init --stop-timeout 45 \
#       -e OPIK_URL_OVERRIDE=https://www.comet.com/opik/api/ -e OPIK_API_KEY -e OPIK_WORKSPACE \
#       -e RUNNER_DAEMON_RUNNER_ID=<runner id from `runner-daemon pair`> \
#       -e RUNNER_DAEMON_BRIDGE_KEY_FILE=/run/secrets/bridge-key \
#       -v "$PWD/bridge-key:/run/secrets/bridge-key:ro" \
#       -v "$PWD/my-project:/workspace" \
#       runner-daemon
#
# --init: the daemon runs as PID 1. It handles SIGTERM itself (drain, then exit 0) and reaps
#   the Exec commands it starts, but a grandchild orphaned by one of them (`cmd &` in a
#   shell that exits) is re-parented to PID 1, and only an init reaps those: without one they
#   stay zombies until the container stops. --init puts Docker's tini in front. On
#   Kubernetes, which has no --init, start it through the tini installed here
#   (command: ["tini", "--", "runner-daemon"]; see deploy/kubernetes/sidecar.yaml), or set
#   shareProcessNamespace: true so the pause container reaps (that also lets the pod's other
#   containers see this one's processes, environment and files).
# --stop-timeout 45: Docker's default 10 s would SIGKILL a drain (up to 20 s of
#   shutdown_grace_seconds plus final reports).
# The bridge key file must be readable by uid 10001; /workspace must be writable by it
#   (`chown -R 10001:10001 my-project`, or run with --user "$(id -u):$(id -g)").

# --- build: a wheel of the project, installed with its dependencies into a venv -------------
FROM python:3.11-slim AS build
# Extras to install: "syntax" adds JavaScript/TypeScript syntax checks (tree-sitter, binary
# wheels); "" for none. devserver and qr are of no use in a container.
ARG EXTRAS=syntax
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runner_daemon ./runner_daemon
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/runner-daemon \
    && wheel="$(echo /wheels/runner_daemon-*.whl)" \
    && /opt/runner-daemon/bin/pip install "${wheel}${EXTRAS:+[$EXTRAS]}" \
    && /opt/runner-daemon/bin/pip uninstall -y pip setuptools \
    && /opt/runner-daemon/bin/runner-daemon --version

# --- runtime --------------------------------------------------------------------------------
FROM python:3.11-slim
# git: SearchFiles runs `git grep` in a git work tree, and Exec commands use it. bash (already
# in the base image) runs every Exec command. tini: an init for Kubernetes (see above).
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
    RUNNER_DAEMON_HEALTH__LISTEN=127.0.0.1:9464

USER 10001:10001
WORKDIR /workspace
# The daemon drains on SIGTERM (stops polling, lets commands finish, reports) and exits 0.
STOPSIGNAL SIGTERM
# /healthz on the listener above: alive and the loop moving (an Opik outage alone does not
# make it unhealthy; `runner-daemon health --ready` would). Unset RUNNER_DAEMON_HEALTH__LISTEN
# and this check fails: override it with --no-healthcheck then.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["runner-daemon", "health"]
ENTRYPOINT ["runner-daemon"]
CMD ["run"]
