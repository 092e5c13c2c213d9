"""The ``syntax_check`` field of WriteFile and EditFile results.

Python is parsed with the standard library; JavaScript and TypeScript with tree-sitter when
the ``syntax`` extra is installed (otherwise those files are not checked and the field is
absent, as with Opik's runner). A syntax error never fails the command: it is reported.
"""

from __future__ import annotations

import ast
import functools
import warnings
from pathlib import PurePosixPath
from typing import Any

PYTHON_SUFFIXES = frozenset({".py", ".pyw"})
# suffix -> (module, attribute of the language function)
TREE_SITTER_GRAMMARS = {
    ".ts": ("tree_sitter_typescript", "language_typescript"),
    ".mts": ("tree_sitter_typescript", "language_typescript"),
    ".cts": ("tree_sitter_typescript", "language_typescript"),
    ".tsx": ("tree_sitter_typescript", "language_tsx"),
    ".js": ("tree_sitter_javascript", "language"),
    ".mjs": ("tree_sitter_javascript", "language"),
    ".cjs": ("tree_sitter_javascript", "language"),
    ".jsx": ("tree_sitter_javascript", "language"),
}


def check_syntax(path: str, content: str) -> str | None:
    """``"ok"``, ``"syntax_error: line L, col C: ..."``, or None when the type is not checked."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in PYTHON_SUFFIXES:
        return _check_python(content, path)
    grammar = TREE_SITTER_GRAMMARS.get(suffix)
    if grammar is None:
        return None
    language = _tree_sitter_language(*grammar)
    return None if language is None else _check_tree_sitter(content, language)


def _check_python(content: str, path: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escape sequences: not errors
            ast.parse(content, filename=path)
    except SyntaxError as exc:
        # Columns are 0-based, as Opik reports them.
        return f"syntax_error: line {exc.lineno or 0}, col {(exc.offset or 1) - 1}: {exc.msg}"
    except ValueError as exc:  # NUL bytes in the source
        return f"syntax_error: line 1, col 0: {exc}"
    return "ok"


@functools.cache
def _tree_sitter_language(module_name: str, attribute: str) -> Any:
    """The grammar, loaded once; None when the optional packages are missing."""
    try:
        import importlib

        import tree_sitter

        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return tree_sitter.Language(getattr(module, attribute)())


def _check_tree_sitter(content: str, language: Any) -> str:
    import tree_sitter

    root = tree_sitter.Parser(language).parse(content.encode("utf-8")).root_node
    if not root.has_error:
        return "ok"
    problems: list[tuple[int, int, str]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node.type == "ERROR":
            problems.append((node.start_point[0] + 1, node.start_point[1], "syntax_error"))
        elif node.is_missing:
            problems.append((node.start_point[0] + 1, node.start_point[1], "missing_node"))
        else:
            stack.extend(node.children)
    if not problems:
        return "ok"
    line, column, label = min(problems)  # the first problem in the file
    return f"{label}: line {line}, col {column}"
