"""Agents: discovery by reading source, declared agents, the 50 cap, the checklist, the watcher."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.core.models import AgentParam
from runner_daemon.core.settings import Settings, load_settings
from runner_daemon.jobs.agents import BOOTSTRAP, AgentsFound, agents_for, python_for
from runner_daemon.jobs.checklist import build_checklist, file_tree
from runner_daemon.jobs.discovery import MAX_FILE_BYTES, Walk, agents_in_source, discover_agents
from runner_daemon.jobs.watch import watch_agents
from runner_daemon.system.workspace import Workspace
from tests.support import environ_without_settings, until

REPO = Path(__file__).resolve().parent.parent
IMPORTS = """\
import typing
import typing as t
from typing import Annotated, Dict, List, Optional, Union
import opik
from opik import Prompt, ChatPrompt
from opik.rest_api.types.prompt_version_detail import PromptVersionDetail
"""
DEF_LINE = IMPORTS.count("\n") + 3  # of the def in agent_source(): after a blank line and the decorator


def settings_for(root: Path, **jobs: Any) -> Settings:
    return load_settings(None, {"workspace_root": root, "jobs": jobs}, environ={})


def agent_source(
    name: str = "agent", params: str = "text: str", decorator: str = "@opik.track(entrypoint=True)"
) -> str:
    return f'{IMPORTS}\n{decorator}\ndef {name}({params}):\n    """Does {name}."""\n    return text\n'


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def only_agent(source: str) -> tuple[Any, list[str]]:
    agents, warnings = agents_in_source(source, "a.py")
    assert len(agents) == 1, (agents, warnings)
    return agents[0], warnings


# --- the type mapping and presence, as JOBS.md gives them --------------------------------


@pytest.mark.parametrize(
    ("annotation", "expected", "warned"),
    [
        ("str", "string", False),
        ("int", "integer", False),
        ("float", "float", False),
        ("bool", "boolean", False),
        ("Prompt", "prompt", False),
        ("ChatPrompt", "prompt", False),
        ("opik.Prompt", "prompt", False),
        ("PromptVersionDetail", "prompt_commit", False),
        ("list[int]", "string", False),
        ("dict[str, int]", "string", False),
        ("List[str]", "string", False),
        ("typing.Dict[str, float]", "string", False),
        ("List", "string", False),  # typing.get_origin(typing.List) is list
        ("Optional[int]", "integer", False),
        ("t.Optional[bool]", "boolean", False),
        ("Union[float, None]", "float", False),
        ("Union[None, Prompt]", "prompt", False),
        ("Optional[list[int]]", "string", False),
        ("'int'", "integer", False),  # a forward reference, as get_type_hints resolves it
        ("Annotated[int, 'count']", "integer", False),
        ("list", "string", True),
        ("dict", "string", True),
        ("int | None", "string", True),
        ("Union[int, str]", "string", True),
        ("tuple[int, int]", "string", True),
        ("typing.Any", "string", True),
        ("MyOwnClass", "string", True),
        ("Optional[dict]", "string", True),
    ],
)
def test_annotation_maps_to_opik_type(annotation: str, expected: str, warned: bool) -> None:
    agent, warnings = only_agent(agent_source(params=f"x: {annotation}"))
    assert agent.params == (AgentParam(name="x", type=expected, presence="required"),)
    assert bool(warnings) is warned
    if warned:
        assert "x" in warnings[0] and "registered as string" in warnings[0]


def test_a_prompt_class_not_from_opik_is_not_a_prompt() -> None:
    source = "import opik\nclass Prompt: ...\n" + agent_source(params="p: Prompt").replace(IMPORTS, "")
    agent, warnings = only_agent(source)
    assert agent.params[0].type == "string" and warnings


def test_no_annotation_is_string_and_presence_follows_defaults() -> None:
    agent, warnings = only_agent(
        agent_source(params="a, /, b: int, c: float = 1.0, *args: int, d: bool, e: str = 'x', **kwargs: int")
    )
    assert [(p.name, p.type, p.presence) for p in agent.params] == [
        ("a", "string", "required"),
        ("b", "integer", "required"),
        ("c", "float", "optional"),
        ("d", "boolean", "required"),
        ("e", "string", "optional"),
    ]
    assert warnings == []


def test_name_description_and_async() -> None:
    source = IMPORTS + textwrap.dedent(
        '''
        @opik.track(entrypoint=True, name="Named agent", project_name="p")
        async def answer(question: str) -> str:
            """Answers a question.

                Indented detail.
            """
            return question

        @opik.track("positional", entrypoint=True)
        def second():
            return 1
        '''
    )
    agents, warnings = agents_in_source(source, "pkg/a.py")
    assert warnings == []
    first, second = agents
    assert (first.name, first.function, first.path) == ("Named agent", "answer", "pkg/a.py")
    assert first.description == "Answers a question.\n\nIndented detail."
    assert (
        first.source == f"pkg/a.py:{source.splitlines().index('async def answer(question: str) -> str:') + 1}"
    )
    assert (second.name, second.function, second.description, second.params) == (
        "positional",
        "second",
        "",
        (),
    )


@pytest.mark.parametrize(
    ("header", "decorator"),
    [
        ("import opik", "@opik.track(entrypoint=True)"),
        ("import opik as o", "@o.track(entrypoint=True, name='agent')"),
        ("from opik import track", "@track(entrypoint=True)"),
        ("from opik import track as tr", "@tr(name='agent', entrypoint=True)"),
    ],
)
def test_every_spelling_of_the_decorator_is_found(header: str, decorator: str) -> None:
    source = f"{header}\n{decorator}\ndef agent(text: str):\n    return text\n"
    agent, warnings = only_agent(source)
    assert agent.name == "agent" and warnings == []


@pytest.mark.parametrize(
    "source",
    [
        "import opik\n@opik.track\ndef f(): ...\n",
        "import opik\n@opik.track(name='x')\ndef f(): ...\n",
        "import opik\n@opik.track(entrypoint=False)\ndef f(): ...\n",
        # A function of the user's own named track, not Opik's.
        "def track(**kw):\n    return lambda f: f\n@track(entrypoint=True)\ndef f(): ...\n",
        "from mylib import track\n@track(entrypoint=True)\ndef f(): ...\n",
        "import opik\ntext = 'entrypoint=True'\n",
    ],
)
def test_what_is_not_an_entrypoint_agent(source: str) -> None:
    assert agents_in_source(source, "a.py") == ([], [])


def test_entrypoints_not_at_module_level_are_warned_about_not_served() -> None:
    source = textwrap.dedent(
        """
        import opik
        class Agents:
            @opik.track(entrypoint=True)
            def method(self): ...
        def outer():
            @opik.track(entrypoint=True)
            def inner(): ...
        @opik.track(entrypoint=flag)
        def dynamic(): ...
        @opik.track(entrypoint=True, name=NAME)
        def named(): ...
        """
    )
    agents, warnings = agents_in_source(source, "a.py")
    assert agents == []
    assert len(warnings) == 4
    assert any("method" in w and "module level" in w for w in warnings)
    assert any("inner" in w and "module level" in w for w in warnings)
    assert any("dynamic" in w and "entrypoint=" in w for w in warnings)
    assert any("named" in w and "name=" in w for w in warnings)


# --- the walk: skip folders, deny-lists, bounds, order ---------------------------------


def test_discovery_walks_the_workspace_in_order_and_skips_what_it_must(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(root / "b.py", agent_source("bravo"))
    write(root / "a" / "deep" / "z.py", agent_source("alpha"))
    write(root / "c.py", agent_source("charlie_async").replace("def ", "async def "))
    for skipped in (".venv/lib", "node_modules/pkg", "__pycache__", ".git/hooks", "build", ".hidden"):
        write(root / skipped / "agent.py", agent_source("skipped_" + skipped.split("/")[0].strip(".")))
    write(root / "secrets" / "agent.py", agent_source("denied_folder"))
    write(root / "agent_private.py", agent_source("denied_file"))
    write(root / "broken.py", "# entrypoint\ndef broken(:\n")
    write(root / "no_marker.py", "def broken(:\n")  # never parsed: no marker, so no warning
    discovery = discover_agents(Workspace(root, ["secrets/", "*_private.py"]))
    assert [a.name for a in discovery.agents] == ["alpha", "bravo", "charlie_async"]
    assert [a.path for a in discovery.agents] == ["a/deep/z.py", "b.py", "c.py"]
    assert discovery.warnings == ("broken.py: not valid Python (line 2); skipped",)


def test_a_large_file_is_skipped_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path / "big.py", agent_source("big") + "#" * MAX_FILE_BYTES)
    write(tmp_path / "small.py", agent_source("small"))
    discovery = discover_agents(Workspace(tmp_path))
    assert [a.name for a in discovery.agents] == ["small"]
    assert len(discovery.warnings) == 1 and discovery.warnings[0].startswith("big.py: over")


def test_the_number_of_files_read_is_bounded(tmp_path: Path) -> None:
    for index in range(5):
        write(tmp_path / f"m{index}.py", agent_source(f"agent{index}"))
    discovery = discover_agents(Workspace(tmp_path), max_files=3)
    assert [a.name for a in discovery.agents] == ["agent0", "agent1", "agent2"]
    assert discovery.warnings == ("more than 3 Python files: m3.py and those after it not read",)


def test_a_walk_is_bounded_in_entries_yielded_and_listed(tmp_path: Path) -> None:
    for index in range(30):
        write(tmp_path / f".hidden{index:02}", "")
    write(tmp_path / "sub" / "a.txt", "")
    write(tmp_path / "sub" / "b.txt", "")
    whole = Walk(Workspace(tmp_path))
    assert [entry.relative for entry in whole] == ["sub", "sub/a.txt", "sub/b.txt"] and not whole.cut
    yielded = Walk(Workspace(tmp_path), max_entries=2)
    assert [entry.relative for entry in yielded] == ["sub", "sub/a.txt"] and yielded.cut
    listed = Walk(Workspace(tmp_path), max_listed=20)  # the hidden names count as looked at
    assert list(listed) == [] and listed.cut


def test_the_first_of_two_agents_of_one_name_is_served(tmp_path: Path) -> None:
    write(tmp_path / "a.py", agent_source("same"))
    write(tmp_path / "b.py", agent_source("same"))
    discovery = discover_agents(Workspace(tmp_path))
    assert [a.path for a in discovery.agents] == ["a.py"]
    assert (
        len(discovery.warnings) == 1 and "b.py" in discovery.warnings[0] and "a.py" in discovery.warnings[0]
    )


@pytest.mark.adversarial
def test_discovery_never_runs_the_code_it_reads(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write(
        tmp_path / "ws" / "agent.py",
        f"open({str(marker)!r}, 'w').close()\n" + agent_source("agent"),
    )
    (tmp_path / "ws" / "agent.pth").write_text(f"import os; open({str(marker)!r}, 'w')\n")
    found = agents_for(settings_for(tmp_path / "ws"))
    assert [spec.name for spec in found.specs] == ["agent"]
    assert not marker.exists()


@pytest.mark.adversarial
def test_discovery_and_tree_follow_no_symlink_and_never_block_on_a_fifo(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "stolen.py", agent_source("stolen"))
    root = tmp_path / "ws"
    write(root / "real.py", agent_source("real"))
    (root / "link").symlink_to(outside)
    (root / "link.py").symlink_to(outside / "stolen.py")
    os.mkfifo(root / "fifo.py")
    discovery = discover_agents(Workspace(root))
    assert [a.name for a in discovery.agents] == ["real"]
    assert file_tree(Workspace(root)) == "real.py"


# --- agents_for: declared and discovered, merged -------------------------------------


def test_declared_and_discovered_agents_are_merged_declared_first(tmp_path: Path) -> None:
    write(tmp_path / "src" / "agent.py", agent_source("found", params="text: str, n: int = 3"))
    settings = settings_for(
        tmp_path,
        sandbox=True,
        agents={
            "echo": {
                "command": ["node", "echo.js"],
                "description": "Echoes",
                "params": [{"name": "text"}, {"name": "n", "type": "integer", "presence": "optional"}],
                "timeout": 60,
                "sandbox": False,
            }
        },
    )
    found = agents_for(settings)
    declared, discovered = found.specs
    assert declared.argv == ("node", "echo.js")
    assert (declared.language, declared.timeout, declared.sandbox) == (None, 60, False)
    assert declared.source == "declared in [jobs.agents.echo]"
    assert declared.params == (
        AgentParam(name="text", type="string", presence="required"),
        AgentParam(name="n", type="integer", presence="optional"),
    )
    assert discovered.argv == ("python3", str(BOOTSTRAP), str(tmp_path / "src" / "agent.py"), "found")
    assert (discovered.language, discovered.timeout, discovered.sandbox) == ("python", None, True)
    assert discovered.source == f"src/agent.py:{DEF_LINE}"
    assert discovered.description == "Does found."
    registrations = found.registrations()
    assert list(registrations) == ["echo", "found"]
    assert registrations["found"].model_dump(exclude_none=True) == {
        "description": "Does found.",
        "language": "python",
        "params": [
            {"name": "text", "type": "string", "presence": "required"},
            {"name": "n", "type": "integer", "presence": "optional"},
        ],
        "timeout": 0,
    }


def test_a_declared_agent_wins_a_name_clash(tmp_path: Path) -> None:
    write(tmp_path / "agent.py", agent_source("echo"))
    found = agents_for(settings_for(tmp_path, agents={"echo": {"command": ["cat"]}}))
    assert [(spec.name, spec.argv) for spec in found.specs] == [("echo", ("cat",))]
    assert len(found.warnings) == 1
    assert "agent.py" in found.warnings[0] and "[jobs.agents.echo]" in found.warnings[0]


def test_discovery_can_be_switched_off(tmp_path: Path) -> None:
    write(tmp_path / "agent.py", agent_source("found"))
    assert agents_for(settings_for(tmp_path, discover=False)).specs == ()


def test_at_most_50_agents_the_rest_named_in_a_warning(tmp_path: Path) -> None:
    declared = {f"declared{index:02}": {"command": ["true"]} for index in range(45)}
    for index in range(8):
        write(tmp_path / f"agent{index}.py", agent_source(f"found{index}"))
    found = agents_for(settings_for(tmp_path, agents=declared))
    assert len(found.specs) == 50
    assert [spec.name for spec in found.specs[45:]] == [f"found{index}" for index in range(5)]
    (warning,) = found.warnings
    assert "53 agents" in warning
    assert all(f"found{index} (agent{index}.py:{DEF_LINE})" in warning for index in (5, 6, 7))
    assert "found4" not in warning
    assert agents_for(settings_for(tmp_path, agents=declared)) == found


def test_the_interpreter_of_discovered_agents(tmp_path: Path) -> None:
    write(tmp_path / "agent.py", agent_source("found"))
    assert python_for(settings_for(tmp_path)) == "python3"
    venv_python = tmp_path / ".venv" / "bin" / "python"
    write(venv_python, "#!/bin/sh\n")
    assert python_for(settings_for(tmp_path)) == "python3"  # not executable: not an interpreter
    venv_python.chmod(0o755)
    assert python_for(settings_for(tmp_path)) == str(venv_python)
    assert agents_for(settings_for(tmp_path)).specs[0].argv[0] == str(venv_python)
    assert python_for(settings_for(tmp_path, python="/opt/py/bin/python3.12")) == "/opt/py/bin/python3.12"


# --- the checklist ----------------------------------------------------------------------


def test_checklist_has_opiks_fields_and_a_tree_that_honours_the_deny_lists(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(root / "src" / "agent.py", agent_source("found"))
    write(root / "src" / "pkg" / "util.py", "x = 1\n")
    write(root / "README.md", "# readme\n")
    write(root / "secrets" / "key.txt", "k")
    write(root / ".env", "OPIK_API_KEY=x")
    write(root / "node_modules" / "dep" / "index.js", "//")
    write(root / ".venv" / "bin" / "python", "")
    settings = load_settings(None, {"workspace_root": root, "deny_paths": [".env", "secrets/"]}, environ={})
    checklist = build_checklist(settings, agents_for(settings))
    assert checklist["runner_type"] == "endpoint"
    assert checklist["command"] is None
    assert checklist["platform"] == sys.platform
    assert checklist["project_root"] == str(root)
    assert checklist["python_executable"]
    assert checklist["file_tree"] == "README.md\nsrc/\nsrc/agent.py\nsrc/pkg/\nsrc/pkg/util.py"
    assert checklist["instrumentation"] == {"tracing": True, "entrypoint": True, "prompts": False}
    assert f"src/agent.py:{DEF_LINE - 1}:@opik.track(entrypoint=True)" in checklist["instrumentation_matches"]
    assert "src/agent.py:4:import opik" in checklist["instrumentation_matches"]


def test_the_tree_is_cut_at_1000_entries_and_counts_them_all(tmp_path: Path) -> None:
    for folder in range(3):
        for index in range(400):
            write(tmp_path / f"d{folder}" / f"f{index:03}.txt", "")
    lines = file_tree(Workspace(tmp_path)).split("\n")
    assert len(lines) == 1001
    assert lines[0] == "d0/" and lines[1] == "d0/f000.txt" and lines[401] == "d1/"
    assert lines[-1] == "[truncated: 1203 total files]"


def test_a_tree_of_long_paths_is_cut_by_size_too(tmp_path: Path) -> None:
    for index in range(50):
        write(tmp_path / f"{index:02}{'x' * 200}", "")
    lines = file_tree(Workspace(tmp_path), max_chars=2000).split("\n")
    assert len("\n".join(lines[:-1])) <= 2000
    assert lines[-1] == "[truncated: 50 total files]"


def test_instrumentation_flags_come_from_every_file_and_matches_are_capped(tmp_path: Path) -> None:
    write(tmp_path / "a.py", "import opik\n" * 60)
    write(tmp_path / "b.ts", "const p = await client.getPrompt({name: 'x'});\n")
    settings = settings_for(tmp_path, agents={"echo": {"command": ["cat"]}})
    checklist = build_checklist(settings, agents_for(settings))
    # Opik's own runner derives the flags from its first 50 matches and would miss b.ts.
    assert checklist["instrumentation"] == {"tracing": True, "entrypoint": True, "prompts": True}
    matches = checklist["instrumentation_matches"]
    assert len(matches) == 50 and matches[0] == "a.py:1:import opik"
    unserved = build_checklist(settings, AgentsFound((), (), "python3"))
    assert unserved["instrumentation"] == {"tracing": True, "entrypoint": False, "prompts": True}


# --- the watcher --------------------------------------------------------------------------


def names(found: AgentsFound) -> list[str]:
    return [spec.name for spec in found.specs]


@pytest.mark.anyio
async def test_the_watcher_publishes_the_set_when_a_file_is_edited_added_or_removed(tmp_path: Path) -> None:
    write(tmp_path / "one.py", agent_source("alpha"))
    write(tmp_path / "notes.py", "x = 1\n")
    published: list[AgentsFound] = []

    async def consume() -> None:
        async with aclosing(watch_agents(settings_for(tmp_path), interval=0.05)) as sets:
            async for found in sets:
                published.append(found)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await until(lambda: published)
        assert names(published[0]) == ["alpha"]
        write(tmp_path / "one.py", agent_source("alpha_renamed"))
        await until(lambda: names(published[-1]) == ["alpha_renamed"])
        write(tmp_path / "sub" / "two.py", agent_source("bravo"))
        await until(lambda: names(published[-1]) == ["alpha_renamed", "bravo"])
        (tmp_path / "one.py").unlink()
        await until(lambda: names(published[-1]) == ["bravo"])
        count = len(published)
        # A change that leaves the agents as they are publishes nothing new.
        write(tmp_path / "notes.py", "x = 2  # longer now\n")
        await anyio.sleep(0.5)  # room for scans that must publish nothing (asserted below, not timed)
        write(tmp_path / "sub" / "zed.py", agent_source("charlie"))
        await until(lambda: names(published[-1]) == ["bravo", "charlie"])
        assert len(published) == count + 1
        tg.cancel_scope.cancel()


# --- runner-daemon agents, in a real process -------------------------------------------


def test_the_agents_command_prints_each_agent_and_why_in_a_real_process(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(
        root / "src" / "agent.py", agent_source("summarize", params="text: str, extra: list, words: int = 50")
    )
    write(root / "bad.py", "# entrypoint\ndef (:\n")
    config = write(
        tmp_path / "runner.toml",
        '[jobs.agents.echo]\ncommand = ["node", "echo.js"]\ndescription = "Echoes"\ntimeout = 60\n',
    )
    argv = [sys.executable, "-m", "runner_daemon", "agents", "--config", str(config)]
    proc = subprocess.run(
        [*argv, "--workspace-root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env=environ_without_settings(),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("2 agent(s) would be registered")
    assert "echo\n  found:   declared in [jobs.agents.echo]" in out
    assert "  runs:    node echo.js" in out and "  timeout: 60 s" in out
    assert f"summarize\n  found:   @opik.track(entrypoint=True) at src/agent.py:{DEF_LINE}" in out
    assert "  params:  text: string (required), extra: string (required), words: integer (optional)" in out
    assert f"  runs:    python3 {BOOTSTRAP} {root / 'src' / 'agent.py'} summarize" in out
    assert "warnings:\n" in out and "extra" in out and "bad.py: not valid Python (line 2); skipped" in out

    bad = subprocess.run(
        [*argv, "--workspace-root", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env=environ_without_settings(),
    )
    assert bad.returncode == 78
    assert bad.stderr.startswith("runner-daemon: config error: workspace_root: ")
