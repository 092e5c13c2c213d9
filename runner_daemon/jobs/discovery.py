"""Agents found in the workspace: ``@opik.track(entrypoint=True)`` functions, read with ``ast``.

The source is parsed, never imported or run: finding agents must not execute the user's code
(an import may start servers, spend tokens, or be hostile). Names, docstrings and params are
derived from the syntax as Opik's SDK derives them from the live function
(``opik.runner.registry.extract_params``, ``../shared/JOBS.md``); an annotation that names
something we cannot see without importing is ``string`` plus a warning, as Opik does for a type
it does not support.

The walk is anchored at the root: folders are opened by descriptor with ``O_NOFOLLOW``, files
with ``O_NOFOLLOW | O_NONBLOCK``, symlinks are never followed, so a folder swapped for a link
mid-walk leads nowhere outside. Hidden entries, :data:`SKIP_DIRS` and denied paths are left
out, and every walk is bounded (entries looked at, depth, files read, bytes per file).
"""

from __future__ import annotations

import ast
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from runner_daemon.core.models import AgentParam
from runner_daemon.system.workspace import SKIP_DIRS, Workspace

MAX_WALK_ENTRIES = 50_000  # entries a walk yields
MAX_LISTED = 4 * MAX_WALK_ENTRIES  # entries a walk lists, skipped ones included
MAX_DEPTH = 32  # folders deeper than this are not entered (each level holds a descriptor)
MAX_FILES = 5_000  # Python files considered per discovery
MAX_FILE_BYTES = 1024 * 1024  # larger files are skipped, not read
MARKER = b"entrypoint"  # the cheap pre-filter: only files holding it are parsed

_PRIMITIVES = {"str": "string", "int": "integer", "float": "float", "bool": "boolean"}
# Subclasses of opik's BasePrompt (opik.api_objects.prompt): Opik registers them as "prompt".
_PROMPT_CLASSES = frozenset({"Prompt", "ChatPrompt", "BasePrompt"})
_TYPING_MODULES = frozenset({"typing", "typing_extensions"})


@dataclass(frozen=True, slots=True)
class Walked:
    """One entry of a walk: ``folder_fd`` (its folder, open until the next entry) and ``name``
    are how to open it without following a link; ``relative`` is its root-relative path."""

    relative: str
    name: str
    is_dir: bool
    folder_fd: int


def _listing(folder_fd: int, limit: int) -> list[tuple[str, bool, bool]]:
    """(name, is folder, is file) of an open folder, at most ``limit`` of them, sorted by name;
    symlinks are neither."""
    try:
        with os.scandir(folder_fd) as entries:
            listed = [
                (entry.name, entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False))
                for entry in itertools.islice(entries, limit)
            ]
    except OSError:
        return []  # an unreadable folder is skipped, as ListFiles does
    listed.sort()
    return listed


def _open_folder(folder_fd: int, name: str) -> int | None:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError:
        return None


class Walk:
    """The workspace's folders and regular files, depth first, each folder before its contents
    and the entries of a folder in name order; at most ``max_entries`` of them, from at most
    ``max_listed`` listed (past either bound the walk stops and :attr:`cut` is true).

    Left out: hidden names (``.git``, ``.venv``, ``.env``…), :data:`SKIP_DIRS`, whatever the
    deny-list forbids reading, symlinks, and folders deeper than :data:`MAX_DEPTH`.
    """

    def __init__(
        self, workspace: Workspace, *, max_entries: int = MAX_WALK_ENTRIES, max_listed: int = MAX_LISTED
    ) -> None:
        self.workspace = workspace
        self.max_entries = max_entries
        self.max_listed = max_listed
        self.cut = False

    def __iter__(self) -> Iterator[Walked]:
        workspace = self.workspace
        try:
            root_fd = os.open(workspace.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        stack: list[tuple[int, Iterator[tuple[str, bool, bool]], str]] = []
        seen = 0
        budget = self.max_listed

        def enter(folder_fd: int, prefix: str) -> bool:
            nonlocal budget
            listed = _listing(folder_fd, budget + 1)
            budget -= len(listed)
            stack.append((folder_fd, iter(listed), prefix))
            return budget >= 0

        try:
            if not enter(root_fd, ""):
                self.cut = True
                return
            while stack:
                folder_fd, entries, prefix = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    os.close(stack.pop()[0])
                    continue
                name, is_dir, is_file = entry
                relative = prefix + name
                if (
                    name.startswith(".")
                    or not (is_dir or is_file)
                    or (is_dir and name in SKIP_DIRS)
                    or workspace.denied(workspace.root / relative)
                ):
                    continue
                if seen == self.max_entries:
                    self.cut = True
                    return
                seen += 1
                yield Walked(relative, name, is_dir, folder_fd)
                if (
                    is_dir
                    and len(stack) <= MAX_DEPTH
                    and (child := _open_folder(folder_fd, name)) is not None
                    and not enter(child, relative + "/")
                ):
                    self.cut = True
                    return
        finally:
            for folder_fd, _, _ in stack:
                os.close(folder_fd)


def read_small_file(entry: Walked, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
    """The bytes of a walked regular file, or ``None`` when it is over ``max_bytes``, not a
    regular file (any more), or unreadable. Opened without following a link or blocking."""
    try:
        fd = os.open(
            entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry.folder_fd
        )
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(max_bytes + 1)
        return data if len(data) <= max_bytes else None
    except OSError:
        return None
    finally:
        os.close(fd)


def python_files(walk: Walk) -> Iterator[Walked]:
    """The ``.py`` files of a walk: the files discovery considers."""
    return (entry for entry in walk if not entry.is_dir and entry.name.endswith(".py"))


@dataclass(frozen=True)
class DiscoveredAgent:
    """A function decorated ``@opik.track(entrypoint=True)``, as Opik would register it."""

    name: str
    function: str  # the function's own name, which the bootstrap looks up in the module
    description: str
    params: tuple[AgentParam, ...]
    path: str  # root-relative POSIX path of its file
    line: int  # of the ``def``

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Discovery:
    agents: tuple[DiscoveredAgent, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass
class _Imports:
    """What the module's top-level imports bind: enough to tell ``opik.track`` and
    ``typing.Optional`` from a user's own function or class of the same name."""

    modules: dict[str, str] = field(default_factory=dict)  # local name -> module ("o" -> "opik")
    names: dict[str, str] = field(default_factory=dict)  # local name -> "module.name"

    @classmethod
    def of(cls, module: ast.Module) -> _Imports:
        imports = cls()
        for node in module.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        imports.modules[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        imports.modules[top] = top
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    imports.names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        return imports

    def qualified(self, node: ast.expr) -> str | None:
        """The dotted name an expression refers to through the imports (``t.Optional`` →
        ``typing.Optional``); a bare name nothing imported is ``builtins.NAME``."""
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in self.modules:
                return self.modules[node.id]
            return f"builtins.{node.id}"
        if isinstance(node, ast.Attribute):
            base = self.qualified(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None


def _is_track(qualified: str | None) -> bool:
    return qualified is not None and qualified.split(".")[0] == "opik" and qualified.endswith(".track")


def _param_type(annotation: ast.expr | None, imports: _Imports) -> str | None:
    """Opik's type name for an annotation, or ``None`` when Opik would not support it (then
    it registers ``string`` and warns). ``Optional[T]``/``Union[T, None]`` are unwrapped, as
    ``typing.get_origin`` sees them; ``T | None`` is not, as Opik does not."""
    if annotation is None:
        return "string"
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:  # a forward reference: typing.get_type_hints evaluates it
            annotation = ast.parse(annotation.value.strip(), mode="eval").body
        except SyntaxError:
            return None
        return _param_type(annotation, imports)
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    name = imports.qualified(target) or ""
    module, _, short = name.rpartition(".")
    if isinstance(annotation, ast.Subscript):
        if module in _TYPING_MODULES and short == "Annotated" and isinstance(annotation.slice, ast.Tuple):
            return _param_type(annotation.slice.elts[0], imports)  # get_type_hints drops the extras
        if module in _TYPING_MODULES and short in ("Optional", "Union"):
            inner = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
            rest = [node for node in inner if not (isinstance(node, ast.Constant) and node.value is None)]
            if len(rest) == 1 and (short == "Union" or len(inner) == 1):
                return _param_type(rest[0], imports)
            return None
        if name in ("builtins.list", "builtins.dict") or (
            module in _TYPING_MODULES and short in ("List", "Dict")
        ):
            return "string"
        return None
    if module == "builtins" and short in _PRIMITIVES:
        return _PRIMITIVES[short]
    if module in _TYPING_MODULES and short in ("List", "Dict"):
        return "string"  # typing.get_origin(typing.List) is list
    if name.split(".")[0] == "opik":
        if short in _PROMPT_CLASSES:
            return "prompt"
        if short == "PromptVersionDetail":
            return "prompt_commit"
    return None


def _params(
    function: ast.FunctionDef | ast.AsyncFunctionDef, imports: _Imports
) -> tuple[list[AgentParam], list[str]]:
    """Params in signature order without ``*args``/``**kwargs``, and the names whose type
    Opik would not resolve."""
    arguments = function.args
    positional = [*arguments.posonlyargs, *arguments.args]
    first_default = len(positional) - len(arguments.defaults)
    has_default = [index >= first_default for index in range(len(positional))]
    has_default += [default is not None for default in arguments.kw_defaults]
    params: list[AgentParam] = []
    unresolved: list[str] = []
    for argument, default in zip([*positional, *arguments.kwonlyargs], has_default, strict=True):
        kind = _param_type(argument.annotation, imports)
        if kind is None:
            unresolved.append(argument.arg)
        presence = "optional" if default else "required"
        params.append(AgentParam(name=argument.arg, type=kind or "string", presence=presence))
    return params, unresolved


def _entrypoint_call(decorator: ast.expr, imports: _Imports) -> ast.Call | None:
    """The decorator's call when it is ``opik.track(…, entrypoint=…)`` (however imported)."""
    if not isinstance(decorator, ast.Call) or not _is_track(imports.qualified(decorator.func)):
        return None
    if any(keyword.arg == "entrypoint" for keyword in decorator.keywords):
        return decorator
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def agents_in_source(source: bytes | str, path: str) -> tuple[list[DiscoveredAgent], list[str]]:
    """The entrypoint agents one module defines at its top level, and warnings about it.

    Raises ``SyntaxError``/``ValueError`` when the source does not parse (the caller
    words the warning). Only module-level functions are agents: the bootstrap finds the
    function by name in the module, as Opik's decorator registers it when the module runs.
    """
    module = ast.parse(source, filename=path)
    imports = _Imports.of(module)
    agents: list[DiscoveredAgent] = []
    warnings: list[str] = []
    top_level = {id(node) for node in module.body}
    for node in ast.walk(module):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        call = next((c for d in node.decorator_list if (c := _entrypoint_call(d, imports))), None)
        if call is None:
            continue
        where = f"{path}:{node.lineno}"
        entrypoint = _keyword(call, "entrypoint")
        if not isinstance(entrypoint, ast.Constant):
            warnings.append(f"{where}: {node.name}: entrypoint= is not a literal; not served")
            continue
        if not entrypoint.value:
            continue
        if id(node) not in top_level:
            warnings.append(f"{where}: {node.name}: an entrypoint not at module level is not served")
            continue
        name_node = _keyword(call, "name") or (call.args[0] if call.args else None)
        if name_node is None or (isinstance(name_node, ast.Constant) and name_node.value is None):
            name = node.name
        elif isinstance(name_node, ast.Constant) and isinstance(name_node.value, str):
            name = name_node.value
        else:
            warnings.append(f"{where}: {node.name}: name= is not a string literal; not served")
            continue
        if not name or len(name) > 128 or not name.isprintable():
            warnings.append(f"{where}: agent name {name!r} is empty, too long or unprintable; not served")
            continue
        params, unresolved = _params(node, imports)
        if unresolved:
            warnings.append(
                f"{where}: {name}: unsupported type for {', '.join(unresolved)}; registered as string "
                "(Opik maps str, int, float, bool, Prompt, PromptVersionDetail, list[...], dict[...] "
                "and Optional[...] of these; not T | None)"
            )
        description = ast.get_docstring(node, clean=True) or ""
        agents.append(DiscoveredAgent(name, node.name, description, tuple(params), path, node.lineno))
    return agents, warnings


def discover_agents(
    workspace: Workspace, *, max_files: int = MAX_FILES, max_file_bytes: int = MAX_FILE_BYTES
) -> Discovery:
    """Every entrypoint agent in the workspace, in walk order; the first of a name wins.

    Blocking (it reads files): call it in a worker thread. A file that is too large or does
    not parse is skipped with a warning; the walk's bounds are warned about when reached.
    """
    agents: dict[str, DiscoveredAgent] = {}
    warnings: list[str] = []
    walk = Walk(workspace)
    for count, entry in enumerate(python_files(walk)):
        if count == max_files:
            warnings.append(
                f"more than {max_files} Python files: {entry.relative} and those after it not read"
            )
            break
        data = read_small_file(entry, max_file_bytes)
        if data is None:
            warnings.append(f"{entry.relative}: over {max_file_bytes} bytes or unreadable; not read")
            continue
        if MARKER not in data:
            continue
        try:
            found, notes = agents_in_source(data, entry.relative)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            line = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
            warnings.append(f"{entry.relative}: not valid Python{line}; skipped")
            continue
        warnings += notes
        for agent in found:
            first = agents.setdefault(agent.name, agent)
            if first is not agent:
                warnings.append(
                    f"{agent.source}: agent {agent.name!r} is also at {first.source}; that one is served"
                )
    if walk.cut:
        warnings.append(
            f"the workspace has over {walk.max_entries} files and folders: the rest were not looked at"
        )
    return Discovery(tuple(agents.values()), tuple(warnings))
