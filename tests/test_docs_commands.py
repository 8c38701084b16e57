"""The docs cannot drift from the code: every `python -m af_next_jax...` command and every `experiments/...`
path shown in README.md and docs/*.md must exist and parse.

A command parses when its module runs as `python -m` would run it (runpy) up to the end of its argparse
parsing, and no further: the parse is stopped by raising from `ArgumentParser.parse_args` /
`parse_known_args`, so nothing is trained, converted or written, and no cluster is joined. The
trainer's `--config.KEY=VALUE` overrides, which its own parser leaves over, must then apply to the
experiment the command names (`experiment.load_config`). An experiment path must exist; an
experiment file (one with `get_config`) must load, with its `:ARG` if the docs give one.

Placeholders in the docs are allowed: `[--flag VALUE]` (optional: checked as if given), `...`,
`{a,b,c}` (a synopsis: each of a, b, c must be a subcommand, checked with `--help`), and upper-case
or shell-variable values (`N`, `$SLURM_PROCID`) of options that take numbers or choices, which are
checked with a valid value in their place.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
COMMAND = re.compile(r"(?:^|[\s\"'(])(?:[\w./-]*/)?python3?(?:\.\d+)?\s+-m\s+af_next_jax\b")
EXPERIMENT_PATH = re.compile(r"experiments/[\w./*:-]*")
PLACEHOLDER = re.compile(r"^(\$\{?\w+\}?|[A-Z][A-Z0-9_]*|<[^<>]+>)$")
SHELL_PUNCTUATION = set("();<>|&")  # a token of these ends a command (&&, ;, |, &, >, 2>&1, ...)


def shell_lines(path: str):
    """(line number, text) of each piece of shell a markdown file shows: every line of a fenced code
    block (backslash continuations joined) and every inline code span of the prose."""
    lines = open(os.path.join(REPO, path), encoding="utf-8").read().splitlines()
    in_block, pending, pending_start = False, "", 0
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if not pending:
                pending_start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield pending_start, pending + line
            pending = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) of every `python -m af_next_jax...` in one line of shell, including one
    inside a quoted argument (`--command "python -m ..."`)."""
    if not COMMAND.search(text):
        return []
    found = []
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        if " " in token and COMMAND.search(token):  # a quoted command line inside this one
            found += commands_in(token)
        elif re.fullmatch(r"(?:[\w./-]*/)?python3?(?:\.\d+)?", token) and tokens[i + 1:i + 2] == ["-m"] \
                and i + 2 < len(tokens) and tokens[i + 2].startswith("af_next_jax"):
            arguments = []
            for argument in tokens[i + 3:]:
                if set(argument) <= SHELL_PUNCTUATION:
                    if argument.startswith(">") and arguments and arguments[-1].isdigit():
                        arguments.pop()  # the 2 of 2>&1
                    break
                arguments.append(argument)
            found.append((tokens[i + 2], arguments))
    return found


def expand(arguments: list[str]) -> list[list[str]]:
    """Argument lists to check for one documented command line (see the module docstring)."""
    plain = []
    for argument in arguments:
        argument = argument.removeprefix("[").removesuffix("]")
        if argument and argument != "...":
            plain.append(argument)
    for i, argument in enumerate(plain):
        synopsis = re.fullmatch(r"\{([\w,-]+)\}", argument)
        if synopsis:
            return [plain[:i] + [alternative, "--help"] for alternative in synopsis.group(1).split(",")]
    return [plain]


def documented_commands():
    for path in DOCS:
        for number, text in shell_lines(path):
            for module, arguments in commands_in(text):
                yield pytest.param(module, arguments, id=f"{path}:{number}: {module} {' '.join(arguments)}"[:150])


def documented_experiments():
    for path in DOCS:
        for number, text in shell_lines(path):
            for match in EXPERIMENT_PATH.findall(text):
                spec = match.rstrip(".,:")
                yield pytest.param(spec, id=f"{path}:{number}: {spec}")


class Parsed(Exception):
    """Raised in place of returning from the outermost argparse call: the parse is done."""

    def __init__(self, namespace: argparse.Namespace, extras: list[str]):
        super().__init__("parsed")
        self.namespace, self.extras = namespace, extras


def _example_value(action: argparse.Action, placeholder: str) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type in (int, float):
        return "1"
    return placeholder


def fill_placeholders(parser: argparse.ArgumentParser, arguments: list[str]) -> list[str]:
    """Placeholder values of this parser's numeric or choice options replaced by a valid value."""
    options = {option: action for action in parser._actions for option in action.option_strings}
    filled = []
    for argument in arguments:
        option, equals, value = argument.partition("=")
        if equals and option in options and PLACEHOLDER.match(value):
            argument = f"{option}={_example_value(options[option], value)}"
        elif filled and filled[-1] in options and PLACEHOLDER.match(argument):
            argument = _example_value(options[filled[-1]], argument)
        filled.append(argument)
    return filled


@contextlib.contextmanager
def stop_after_parsing():
    """Make the outermost ArgumentParser.parse_args / parse_known_args raise Parsed with its result.
    (A subcommand's parser is parsed inside its parent's call: only the outermost call stops.)"""
    real_known, real_args = argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args
    state = {"depth": 0, "in_parse_args": False}

    def parse_known_args(self, args=None, namespace=None):
        args = fill_placeholders(self, list(sys.argv[1:] if args is None else args))
        state["depth"] += 1
        try:
            result = real_known(self, args, namespace)
        finally:
            state["depth"] -= 1
        if state["depth"] == 0 and not state["in_parse_args"]:
            raise Parsed(*result)
        return result

    def parse_args(self, args=None, namespace=None):
        state["in_parse_args"] = True
        try:
            namespace = real_args(self, args, namespace)  # its leftover check runs: extras are an error
        finally:
            state["in_parse_args"] = False
        raise Parsed(namespace, [])

    argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args = parse_known_args, parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args = real_known, real_args


def parse_as_python_m(module: str, arguments: list[str]) -> tuple[Parsed | None, str]:
    """Run `python -m module arguments` until it has parsed its arguments. (the Parsed, stderr); None
    when it exited first (`--help`: status 0); an argparse error fails the test with its message."""
    stderr, saved_argv = io.StringIO(), sys.argv
    sys.argv = [module] + arguments
    try:
        with stop_after_parsing(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except Parsed as parsed:
        return parsed, stderr.getvalue()
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return None, stderr.getvalue()
        pytest.fail(f"python -m {module} {shlex.join(arguments)}: exit status {exit_.code}: "
                    f"{stderr.getvalue().strip()[-1500:]}")
    finally:
        sys.argv = saved_argv
    pytest.fail(f"python -m {module} {shlex.join(arguments)} finished without parsing arguments with argparse")


@pytest.mark.parametrize("module,arguments", list(documented_commands()))
def test_documented_command_parses(module, arguments, monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' relative paths (experiments/...) are relative to the repository
    for argv in expand(arguments):
        parsed, _ = parse_as_python_m(module, argv)
        if parsed is None:
            continue
        overrides = [a for a in parsed.extras if a.startswith("--config.") and "=" in a]
        unknown = [a for a in parsed.extras if a not in overrides]
        forwarded_args_check = getattr(parsed.namespace, "forwarded_args_check", None)
        if forwarded_args_check is not None:  # a command that hands what it does not know on (build-shards: Beam)
            forwarded_args_check(unknown)
            unknown = []
        assert not unknown, f"python -m {module}: arguments its parser does not know: {unknown}"
        if overrides or module == "af_next_jax.train":
            from af_next_jax.experiment import load_config
            load_config(parsed.namespace.config, overrides)  # the experiment exists and takes the overrides


@pytest.mark.parametrize("spec", list(documented_experiments()))
def test_documented_experiment_exists_and_loads(spec, monkeypatch):
    monkeypatch.chdir(REPO)
    path, _, _ = spec.partition(":")
    if "*" in path:
        assert glob.glob(path), f"{path} matches no file"
        return
    assert os.path.exists(path), f"{path} does not exist; experiments: {sorted(os.listdir('experiments'))}"
    if path.endswith(".py") and "def get_config" in open(path, encoding="utf-8").read():
        from af_next_jax.experiment import load_config
        load_config(spec)


def test_the_docs_show_commands_and_experiments():
    """The control: the scan finds what the docs are known to hold (a broken scan would test nothing)."""
    ids = [param.id for param in documented_commands()]
    assert any(i.startswith("README.md:") and "af_next_jax.convert to-hf" in i for i in ids), ids
    assert any(i.startswith("docs/TRAINING.md:") and "af_next_jax.train --config" in i for i in ids), ids
    assert any("experiments/debug.py" in param.id for param in documented_experiments())
