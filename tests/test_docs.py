"""The documentation's commands are checked against the code: every command in README.md, docs/*.md and
benchmarks/RESULTS.md must work as written.

From every shell code block (```bash, ```sh, ```shell, ```console):

- each ``crc-train`` / ``crc-export`` / ``crc-infer`` command line (also ``.venv/bin/crc-...`` and
  ``torchrun ... -m crc_train.cli``): its subcommand exists, every flag it uses is listed by that
  subcommand's ``--help``, and a value given to a flag with a fixed set of choices is one of them;
- each ``python benchmarks/X.py`` line: the same against the script's ``--help``;
- every repository path it names (``scripts/``, ``benchmarks/``, ``examples/``, ...) exists, and a script run
  as ``./scripts/x.sh`` or ``bash x.sh`` is executable / parses (``bash -n``);
- ``pip install '.[extra,...]'``: every extra is declared in pyproject.toml;
- ``python -c ...`` one-liners are run for real.

Relative Markdown links (and their ``#anchors``) must resolve. ``--help`` output is computed once per command
(cached). The crc-train / crc-export / benchmark parts need torch and skip in the torch-free environment.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w+-]*)\s*$")

# The console scripts with a default subcommand (`crc-train --epochs 2` runs `crc-train train`).
DEFAULT_SUBCOMMAND = {"crc-train": "train", "crc-infer": "run"}
NEEDS_TORCH = {"crc-train", "crc-export"}
# Top-level folders of the repository: a block token starting with one of these names a repository path.
REPO_DIRS = ("scripts/", "benchmarks/", "examples/", "docs/", "tests/", "train/", "export/", "runtime/")
# Flags whose value is a path the command writes (it need not exist yet).
OUTPUT_FLAGS = {"-o", "--out", "--output", "--json", "--markdown", "--report", "--work", "--triton"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
SHELL_KEYWORDS = {"for", "do", "done", "if", "then", "fi", "while"}
HAS_TORCH = importlib.util.find_spec("torch") is not None


@dataclass(frozen=True)
class Command:
    """One simple command of a shell block: where it is and its words."""

    doc: str
    line: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {shlex.join(self.words)}"


def shell_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of every shell code block of a Markdown file."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line.strip())
        if fence and lang is None:
            lang, start, body = fence.group(1).lower(), number + 1, []
        elif line.strip() == "```" and lang is not None:
            if lang in SHELL_LANGS:
                blocks.append((start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def split_commands(doc: str, start: int, text: str) -> list[Command]:
    """The simple commands of a block: continuations joined, comments dropped, split at ; && | etc."""
    commands = []
    logical, first = "", start
    for offset, line in enumerate(text.split("\n")):
        if not logical:
            first = start + offset
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS:
                while words and words[0] in SHELL_KEYWORDS:
                    words.pop(0)
                if words:
                    commands.append(Command(doc, first, tuple(words)))
                words = []
            else:
                words.append(token)
        logical = ""
    return commands


def all_commands() -> list[Command]:
    found = []
    for path in DOCS:
        for start, text in shell_blocks(path):
            found.extend(split_commands(str(path.relative_to(ROOT)), start, text))
    return found


COMMANDS = all_commands()


@functools.lru_cache(maxsize=1)
def entry_points() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: console script name -> ``module:function``."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


def console_invocation(words: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """(console script, its arguments) when the command runs one of ours, else None."""
    scripts = entry_points()
    name = os.path.basename(words[0])
    if name in scripts:
        return name, list(words[1:])
    if "-m" in words:  # torchrun ... -m crc_train.cli train ..., python -m crc_runtime.cli ...
        at = words.index("-m")
        modules = {target.split(":")[0]: script for script, target in scripts.items()}
        if at + 1 < len(words) and words[at + 1] in modules:
            return modules[words[at + 1]], list(words[at + 2 :])
    return None


@functools.cache
def help_text(argv: tuple[str, ...]) -> str:
    """stdout of ``argv + --help`` (run for real, once per command); fails the test when it fails."""
    result = subprocess.run(
        [*argv, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, (
        f"{shlex.join(argv)} --help exited {result.returncode}: {result.stderr[-2000:]}"
    )
    return result.stdout


def script_argv(script: str, *args: str) -> tuple[str, ...]:
    """argv running console script ``script`` with this interpreter (its pyproject entry point, no PATH)."""
    module, function = entry_points()[script].split(":")
    code = f"import sys; from {module} import {function} as f; sys.argv[0] = {script!r}; sys.exit(f())"
    return (sys.executable, "-c", code, *args)


def subcommands(help_output: str) -> set[str]:
    section = help_output.split("Commands:", 1)[1] if "Commands:" in help_output else ""
    return set(re.findall(r"^  ([a-z][\w-]*)\s", section, re.M))


def options(help_output: str, what: str) -> dict[str, set[str] | None]:
    """Every flag a --help output defines -> its choices (None when the value is free or there is none).

    Flags in the help's own usage examples (lines starting with the command, e.g. ``crc-train compare A1 A2
    --vs B1 B2``) count too: they are arguments the command parses itself.
    """
    found: dict[str, set[str] | None] = {}
    for line in help_output.splitlines():
        if line.strip().startswith(what + " "):
            for flag in re.findall(r"\s(--?[A-Za-z][\w-]*)", line):
                found.setdefault(flag, None)
        head = re.match(r"^\s{2,}(-\S.*?)(?:\s{2,}|$)", line)
        if not head:
            continue
        choices = re.search(r"\[([^\]\s]+\|[^\]\s]+)\]|\{([^}\s]+)\}", head.group(1))
        values = None
        if choices:
            values = (
                set(choices.group(1).split("|")) if choices.group(1) else set(choices.group(2).split(","))
            )
        for flag in re.findall(r"(?:^|[\s,/])(--?[A-Za-z0-9][\w-]*)", head.group(1)):
            found[flag] = values
    return found


def is_placeholder(value: str) -> bool:
    return value.isupper() or any(mark in value for mark in ("$", "<", "...", "/path/"))


def check_flags(command: Command, args: list[str], help_output: str, what: str) -> None:
    known = options(help_output, what)
    for index, word in enumerate(args):
        if not word.startswith("-") or word == "-" or re.fullmatch(r"-\d[\d.e-]*", word):
            continue
        flag, _, inline = word.partition("=")
        assert flag in known, f"{command}\n  {flag} is not an option of `{what}` (see `{what} --help`)"
        value = inline or (args[index + 1] if index + 1 < len(args) else "")
        if known[flag] and value and not is_placeholder(value):
            assert value in known[flag], (
                f"{command}\n  {flag} {value}: `{what}` accepts {sorted(known[flag])}"
            )


def ids(commands: list[Command]) -> list[str]:
    return [f"{c.doc}:{c.line}:{c.words[0]}" for c in commands]


OUR_COMMANDS = [c for c in COMMANDS if console_invocation(c.words)]
BENCHMARK_SCRIPTS = [
    c
    for c in COMMANDS
    if len(c.words) > 1 and c.words[0].startswith("python") and c.words[1].startswith("benchmarks/")
]


def test_the_docs_have_commands_to_check() -> None:
    """The extraction finds what the docs show (guards against a parser that silently finds nothing)."""
    scripts = {console_invocation(c.words)[0] for c in OUR_COMMANDS}
    assert scripts == set(entry_points())
    assert any(c.doc == "README.md" and c.words[0] == "./scripts/demo.sh" for c in COMMANDS)
    assert BENCHMARK_SCRIPTS


@pytest.mark.parametrize("command", OUR_COMMANDS, ids=ids(OUR_COMMANDS))
def test_cli_commands_use_existing_subcommands_and_flags(command: Command) -> None:
    script, args = console_invocation(command.words)
    if script in NEEDS_TORCH and not HAS_TORCH:
        pytest.skip(f"{script} needs torch (the train / export extras)")
    subs = subcommands(help_text(script_argv(script)))
    sub: list[str] = []
    if subs and args and args[0] in subs:
        sub, args = [args[0]], args[1:]
    elif subs:
        default = DEFAULT_SUBCOMMAND.get(script)
        assert default in subs, f"{command}\n  {script} needs a subcommand: {sorted(subs)}"
        sub = [default]
    what = " ".join([script, *sub])
    check_flags(command, args, help_text(script_argv(script, *sub)), what)


@pytest.mark.skipif(not HAS_TORCH, reason="the benchmark scripts need the full install (torch)")
@pytest.mark.parametrize("command", BENCHMARK_SCRIPTS, ids=ids(BENCHMARK_SCRIPTS))
def test_benchmark_commands_use_existing_flags(command: Command) -> None:
    script = command.words[1]
    assert (ROOT / script).is_file(), f"{command}\n  {script} does not exist"
    check_flags(command, list(command.words[2:]), help_text((sys.executable, script)), f"python {script}")


def repo_paths(command: Command) -> list[str]:
    paths = []
    for index, word in enumerate(command.words):
        if index and command.words[index - 1] in OUTPUT_FLAGS:
            continue
        for candidate in [word, word.partition("=")[2]]:
            bare = candidate.removeprefix("./")
            if bare.startswith(REPO_DIRS) and not is_placeholder(bare):
                paths.append(bare)
    return paths


@pytest.mark.parametrize("command", COMMANDS, ids=ids(COMMANDS))
def test_paths_and_scripts_in_shell_blocks_exist(command: Command) -> None:
    for path in repo_paths(command):
        assert (ROOT / path).exists(), f"{command}\n  {path} does not exist in the repository"
    first = command.words[0]
    if first.startswith("./"):
        assert os.access(ROOT / first, os.X_OK), f"{command}\n  {first} is not executable"
    scripts = [w for w in command.words[:2] if w.endswith(".sh")]
    for script in scripts:
        result = subprocess.run(
            ["bash", "-n", str(ROOT / script.removeprefix("./"))], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}\n  bash -n {script}: {result.stderr}"


PIP_INSTALLS = [c for c in COMMANDS if c.words[:2] == ("pip", "install")]


@pytest.mark.parametrize("command", PIP_INSTALLS, ids=ids(PIP_INSTALLS))
def test_pip_extras_exist(command: Command) -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = set(re.findall(r"^([\w-]+)\s*=\s*\[", section, re.M))
    for word in command.words[2:]:
        extras = re.fullmatch(r"\.\[([\w,-]+)\]", word)
        for extra in extras.group(1).split(",") if extras else []:
            assert extra in declared, f"{command}\n  extra [{extra}] is not in pyproject.toml"


ONE_LINERS = [c for c in COMMANDS if c.words[0] == "python" and len(c.words) > 2 and c.words[1] == "-c"]


@pytest.mark.parametrize("command", ONE_LINERS, ids=ids(ONE_LINERS))
def test_python_one_liners_run(command: Command) -> None:
    argv = [sys.executable, *command.words[1:]]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, f"{command}\n  {result.stderr[-2000:]}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", text, re.M)}


LINKS = [
    (path, target)
    for path in [*DOCS, ROOT / "examples" / "README.md"]
    for target in re.findall(
        r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    )
    if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize("path, target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_relative_links_resolve(path: Path, target: str) -> None:
    file, _, anchor = target.partition("#")
    linked = (path.parent / file).resolve() if file else path
    assert linked.exists(), f"{path.relative_to(ROOT)}: link to {target}: {file} does not exist"
    if anchor and linked.suffix == ".md":
        assert anchor in anchors(linked), f"{path.relative_to(ROOT)}: link to {target}: no heading #{anchor}"
