"""The kernel sandbox every process the daemon starts for a command runs in (Landlock).

A :class:`SandboxPolicy` names what a confined process may read and execute (the system, the
toolchains in use) and what it may also write (the workspace, a private temporary folder);
everything else on the filesystem is denied by the kernel: the rest of the home folder,
other users' files, the daemon's state directory. Where the kernel's Landlock ABI has them,
TCP ``bind`` is denied, TCP ``connect`` follows ``[exec] network``, and signals and abstract
UNIX sockets are scoped to the sandbox (a command cannot signal or connect to the daemon or
the user's other processes). Landlock is inherited by every descendant and cannot be lifted.

The policy is applied by a launcher (:mod:`runner_daemon.system.sandbox_exec`) that restricts itself
and then executes the command: :meth:`SandboxPolicy.wrap` turns an argv into the launcher's.
The policy is a plain value, so the jobs loop can confine agent processes the same way.

No library is used: PyPI's ``landlock`` (1.0.0.dev5, alpha) knows neither network rules
(ABI 4) nor scoping (ABI 6), and the three system calls need only a few ``ctypes`` lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from runner_daemon.core.errors import ConfigError
from runner_daemon.core.settings import Settings
from runner_daemon.system import sandbox_exec
from runner_daemon.system.protection import ProtectionProbe
from runner_daemon.system.sandbox_exec import landlock_abi
from runner_daemon.system.workspace import Workspace

# Read and execute: the system. /proc is readable as a whole (tools read /proc/cpuinfo,
# /proc/self/...); what is private in another process's entry (environ, mem, maps, fds)
# is guarded by ptrace checks, which Landlock denies across its domain boundary.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc")
# Devices a shell and common tools need; read and write (writing /dev/null is a redirection).
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
# Files under /etc that are often symlinks elsewhere (/run/systemd/resolve/...): their
# targets must be readable for name resolution and time zones to work.
LINKED_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/localtime", "/etc/nsswitch.conf")

# In the home folder, readable: git's own configuration, without which git refuses to run
# ("unknown error occurred while reading the configuration files").
HOME_CONFIG = (".gitconfig", ".config/git")

# What an ABI lacks, for the start-up line and check-config.
_MISSING_BY_ABI = (
    (2, "renaming or linking files across folders is denied everywhere (no REFER right)"),
    (3, "truncating files is not restricted"),
    (4, "TCP bind and connect are not restricted"),
    (5, "ioctl on devices is not restricted"),
    (6, "signals and abstract UNIX sockets are not scoped to the sandbox"),
)


@dataclass(frozen=True)
class SandboxSupport:
    """What this kernel (and this process's rights) can enforce."""

    abi: int
    missing: tuple[str, ...]
    protects: bool = False  # folders inside the workspace can be made read-only

    @classmethod
    def probe(
        cls, *, check_protection: bool = False, started: ProtectionProbe | None = None
    ) -> SandboxSupport:
        """The Landlock ABI; with ``check_protection``, one launcher run tries a read-only mount
        (the one ``started`` before the daemon's imports, else one run now)."""
        abi = landlock_abi() if sys.platform == "linux" else 0
        missing = [text for needed, text in _MISSING_BY_ABI if abi < needed]
        wanted = abi > 0 and check_protection
        protects = False
        if wanted:
            protects = (started or ProtectionProbe()).result()
        elif started is not None:
            started.discard()
        if wanted and not protects:
            missing.append(
                "folders inside the workspace (.git) cannot be made read-only: no mount namespace here"
            )
        return cls(abi, tuple(missing), protects)

    def describe(self) -> str:
        if self.abi == 0:
            return "Landlock is not available on this kernel"
        missing = "; ".join(self.missing) or "none"
        return f"Landlock ABI {self.abi}; rules this kernel cannot apply: {missing}"


@dataclass(frozen=True)
class SandboxPolicy:
    """Paths a confined process may read (and execute), or also write; and TCP connect."""

    read: tuple[str, ...]
    write: tuple[str, ...]
    network: bool = True
    # Inside writable folders, yet read-only (bind-mounted so): the workspace's .git; and
    # whether this machine can do that (mount namespaces allowed).
    protected: tuple[str, ...] = ()
    protection: bool = False
    launcher: tuple[str, ...] = field(default=(sys.executable, "-I", "-S", sandbox_exec.__file__))

    def allowing_writes(self, *paths: Path) -> SandboxPolicy:
        """The same policy with more writable folders (a command's private temporary one)."""
        return replace(self, write=(*self.write, *map(str, paths)))

    def protecting(self, *paths: Path) -> SandboxPolicy:
        return replace(self, protected=(*self.protected, *map(str, paths)))

    def for_command(self, workspace: Workspace, temporary: Path) -> SandboxPolicy:
        """One command's policy: its temporary folder writable, and the workspace's top-level
        write-denied entries (``.git``) read-only where this machine allows it. Blocking."""
        policy = self.allowing_writes(temporary)
        return policy.protecting(*protected_entries(workspace)) if policy.protection else policy

    def without_writes(self) -> SandboxPolicy:
        """Everything writable becomes read-only (the devices stay writable)."""
        writable = tuple(path for path in self.write if path in DEVICES)
        readable = tuple(dict.fromkeys((*self.read, *(p for p in self.write if p not in DEVICES))))
        return replace(self, read=readable, write=writable, protected=())

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` under this policy."""
        return sandbox_exec.launcher_argv(
            self.launcher, self.read, self.write, self.protected, self.network, list(argv)
        )


def build_policy(
    *,
    workspace: Path,
    state_directory: Path,
    read_paths: Iterable[str] = (),
    write_paths: Iterable[str] = (),
    network: bool = True,
    environ: Mapping[str, str] | None = None,
) -> tuple[SandboxPolicy, list[str]]:
    """The Exec policy, and the derived paths left out because they would expose the state.

    Derived: the Python running the daemon (its venv and base prefixes), each ``PATH`` folder
    and the prefix it is the ``bin`` of (``/usr/local``, ``~/.pyenv``), unless that prefix is
    the home folder itself or holds the state directory. Paths the settings add are taken as
    given, but never one that is or holds the state directory (a :class:`ConfigError`).
    """
    environ = os.environ if environ is None else environ
    state = _real(state_directory)
    home = _real(Path(environ.get("HOME") or Path.home()))
    for given in (*read_paths, *write_paths):
        if _holds(_real(Path(given).expanduser()), state):
            raise ConfigError(f"exec: {given} holds the state directory {state}; commands may not reach it")
    if _holds(_real(workspace), state):
        raise ConfigError(
            f"state_directory {state} is inside workspace_root: commands could read its secrets"
        )
    derived: list[Path] = [
        Path(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    ]
    for entry in environ.get("PATH", "").split(os.pathsep):
        if entry and os.path.isabs(entry):
            derived.append(Path(entry))
            if Path(entry).name in ("bin", "sbin", "shims"):
                derived.append(Path(entry).parent)
    derived += [Path(p).resolve().parent for p in LINKED_FILES if os.path.islink(p)]
    left_out: list[str] = []
    read: list[str] = list(SYSTEM_PATHS)
    for path in derived:
        real = _real(path)
        if real == Path("/"):
            continue  # the parent of /bin and /sbin: never a toolchain's prefix
        if real == home or _holds(real, state):
            left_out.append(str(real))
        elif str(real) not in read:
            read.append(str(real))
    read += [str(home / name) for name in HOME_CONFIG]
    read += [str(Path(p).expanduser()) for p in read_paths]
    write = [str(_real(workspace)), *(str(Path(p).expanduser()) for p in write_paths), *DEVICES]
    return SandboxPolicy(tuple(dict.fromkeys(read)), tuple(dict.fromkeys(write)), network), sorted(
        set(left_out)
    )


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _holds(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def sandbox_for(
    settings: Settings, started: ProtectionProbe | None = None
) -> tuple[SandboxPolicy | None, SandboxSupport, list[str]]:
    """The Exec policy the settings ask for (None when off), what the kernel supports, and
    the derived paths left out; :class:`ConfigError` when Landlock is asked for but missing.
    ``started``: the protection probe begun before the imports, if one was."""
    support = SandboxSupport.probe(check_protection=settings.exec.sandbox == "landlock", started=started)
    if settings.exec.sandbox == "off":
        return None, support, []
    if support.abi == 0:
        raise ConfigError(
            'exec: sandbox = "landlock" but this kernel has no Landlock (Linux 5.13+ with landlock in '
            'its LSM list); set [exec] sandbox = "off" (RUNNER_DAEMON_EXEC__SANDBOX=off) to run '
            "commands unconfined"
        )
    policy, left_out = build_policy(
        workspace=settings.workspace_root,
        state_directory=settings.state_directory,
        read_paths=settings.exec.read_paths,
        write_paths=settings.exec.write_paths,
        network=settings.exec.network,
    )
    return replace(policy, protection=support.protects), support, left_out


def protected_entries(workspace: Workspace) -> list[Path]:
    """The workspace's top-level entries its write deny-list covers (``.git``), to keep read-only.

    Only the top level: a per-command walk of the whole tree would cost more than the rule
    is worth; nested ones (a submodule's ``.git``) stay writable to Exec.
    """
    try:
        with os.scandir(workspace.root) as entries:
            names = [entry.name for entry in entries if not entry.is_symlink()]
    except OSError:
        return []
    return [
        workspace.root / name for name in sorted(names) if workspace.denied(workspace.root / name, write=True)
    ]
