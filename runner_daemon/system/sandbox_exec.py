"""``python -I -S sandbox_exec.py RULE... -- CMD...``: confine this process, then exec CMD.

The launcher of :mod:`runner_daemon.system.sandbox`. Landlock (and the optional read-only bind
mounts) must be applied by the process that will run the command, before its first
instruction; doing that between ``fork`` and ``exec`` of a threaded Python daemon
(``preexec_fn``) is unsafe, so the daemon starts this small program instead, which
restricts itself and then ``execvp``s the command. Landlock domains are inherited by every
descendant and can never be lifted.

It is run as a file with ``-I -S`` and imports only ``ctypes`` (no site, no ``json``, not
the package), so it costs a Python start-up and little more. Each rule is one argument:
``r:PATH`` (read and execute), ``w:PATH`` (also write), ``ro:PATH`` (a folder inside a
writable one made read-only, e.g. the workspace's ``.git``) or ``net:0``/``net:1`` (TCP
connect). Landlock only ever adds rights beneath a path, so it cannot take writes away from a
folder inside a writable one: ``ro:`` paths are bind-mounted read-only onto themselves in a
private mount namespace (inside a user namespace mapping only the caller's own ids, so it
needs no privilege), and Landlock then forbids every mount and unmount, so the command cannot
undo it.
On any failure it prints one line to stderr and exits 125 without running the command: a
command is never run less confined than its policy says.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys

EXIT_SANDBOX_FAILED = 125

# Syscall numbers, the same on x86_64 and aarch64 (the generic table).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_CAP_SYS_PTRACE = 19
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
# statvfs flags a read-only remount must keep (the kernel refuses to clear locked ones).
_KEPT_FLAGS = ((2, 2), (4, 4), (8, 8), (1024, 1024), (2048, 2048), (4096, 1 << 21))

# Filesystem rights, by the ABI version that introduced them.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

FS_ABI1 = (1 << 13) - 1
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
WRITE_RIGHTS = FS_ABI1 | FS_REFER | FS_TRUNCATE | FS_IOCTL_DEV


def fs_rights(abi: int) -> int:
    """Every filesystem right the kernel's ABI knows: all of them are handled (denied by default)."""
    rights = FS_ABI1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class SandboxError(Exception):
    """The policy could not be applied as written."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(errno)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    version = int(libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION))
    return max(version, 0)


def _ruleset_size(abi: int) -> int:
    return 24 if abi >= 6 else 16 if abi >= 4 else 8


def apply_landlock(read: list[str], write: list[str], network: bool) -> None:
    """Restrict this process (and all it will start) to ``policy``; see ``sandbox.py``."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError("the kernel has no Landlock (Linux 5.13 or later, with landlock in the LSM list)")
    handled_fs = fs_rights(abi)
    attr = _RulesetAttr(handled_fs, 0, 0)
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | (0 if network else NET_CONNECT_TCP)
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    ruleset = _check(
        int(libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(_ruleset_size(abi)), 0)),
        "landlock_create_ruleset",
    )
    try:
        for path in read:
            _add_path(libc, ruleset, path, READ_RIGHTS & handled_fs)
        for path in write:
            _add_path(libc, ruleset, path, WRITE_RIGHTS & handled_fs)
        if os.geteuid() == 0:
            # Root's CAP_SYS_PTRACE would read any process's /proc entries (the daemon's
            # environment included) past Landlock's ptrace scoping; a command never needs it.
            _check(int(libc.prctl(_PR_CAPBSET_DROP, _CAP_SYS_PTRACE, 0, 0, 0)), "prctl(PR_CAPBSET_DROP)")
        _check(int(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(int(libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def make_read_only(paths: list[str]) -> None:
    """Bind-mount each path read-only onto itself, for this process and all it starts."""
    libc = _libc()
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        # Root keeps its own namespace's powers over files of every owner; a user namespace
        # would map the other owners away (a sidecar's root could no longer write them).
        _check(int(libc.unshare(_CLONE_NEWNS)), "unshare(mount namespace)")
    else:
        _check(int(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS)), "unshare(user and mount namespaces)")
        maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
        for name, text in maps:
            with open(f"/proc/self/{name}", "w") as stream:
                stream.write(text)
    _check(int(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)), "mount --make-rprivate /")
    for path in paths:
        raw = os.fsencode(path)
        _check(int(libc.mount(raw, raw, None, _MS_BIND | _MS_REC, None)), f"bind mount {path}")
        current = os.statvfs(path).f_flag
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
        flags |= sum(mount_flag for stat_flag, mount_flag in _KEPT_FLAGS if current & stat_flag)
        _check(int(libc.mount(None, raw, None, flags, None)), f"read-only remount of {path}")


def _add_path(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        # Missing here, or out of this user's reach (another user's home folder on PATH):
        # there is nothing to allow, and leaving it out only denies more.
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        rule = _PathBeneathAttr(rights, fd)
        _check(int(libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)), path)
    finally:
        os.close(fd)


def parse_rules(rules: list[str]) -> tuple[list[str], list[str], list[str], bool]:
    """``r:``, ``w:`` and ``ro:`` paths, and whether TCP connect is allowed."""
    paths: dict[str, list[str]] = {"r": [], "w": [], "ro": []}
    network = True
    for rule in rules:
        kind, _, value = rule.partition(":")
        if kind in paths and value:
            paths[kind].append(value)
        elif kind == "net" and value in ("0", "1"):
            network = value == "1"
        else:
            raise SandboxError(f"bad rule {rule!r}")
    return paths["r"], paths["w"], paths["ro"], network


def launcher_argv(
    launcher: list[str] | tuple[str, ...],
    read: tuple[str, ...],
    write: tuple[str, ...],
    protected: tuple[str, ...],
    network: bool,
    argv: list[str] | tuple[str, ...],
) -> list[str]:
    """The argv that runs ``argv`` confined: the rules written here, beside their reader."""
    rules = [
        *(f"r:{p}" for p in read),
        *(f"w:{p}" for p in write),
        *(f"ro:{p}" for p in protected),
        f"net:{int(network)}",
    ]
    return [*launcher, *rules, "--", *argv]


def _find(name: str) -> str:
    """``name`` as ``execvp`` would find it on ``PATH`` (itself when it holds a slash)."""
    if "/" in name:
        return name
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return name


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: sandbox_exec.py r:PATH... w:PATH... net:0|1 -- CMD...", file=sys.stderr)
        return 2
    split = argv.index("--")
    command = argv[split + 1 :]
    program = _find(command[0])  # before the sandbox: os.execvp would import modules it may hide
    try:
        read, write, read_only, network = parse_rules(argv[1:split])
        if read_only:
            make_read_only(read_only)
        apply_landlock(read, write, network)
    except (SandboxError, OSError) as exc:
        print(f"runner-daemon sandbox: not running the command: {exc}", file=sys.stderr)
        return EXIT_SANDBOX_FAILED
    try:
        os.execv(program, command)
    except OSError as exc:
        print(f"runner-daemon sandbox: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126


if __name__ == "__main__":
    sys.exit(main(sys.argv))
