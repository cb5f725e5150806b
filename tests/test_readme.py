"""The README's commands against the jobs they name: every job exists, every flag is one the job takes, every
shipped config a command names is there. Commands that need data this machine lacks cannot run here; their spelling
can still be checked, and the demo's and the front door's are run by other tests (test_cli, test_api)."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO


def readme_commands() -> list[tuple[str, list[str]]]:
    """(job module, arguments) for each `ebd JOB ...` or `python -m jobs.JOB ...` in the README's bash blocks."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]  # a trailing comment
            match = re.search(r"(?:^|[\s/])(?:ebd ([a-z-]+)|python -m jobs\.([a-z_]+))(.*)", line.strip())
            if match:
                job = (match.group(1) or match.group(2)).replace("-", "_")
                commands.append((job, shlex.split(match.group(3).replace("[", " ").replace("]", " "))))
    return commands


def job_help(job: str) -> str:
    """The job's --help text, from its own parser (in this process: one import of torch for all of them)."""
    module = importlib.import_module(f"jobs.{job}")
    out, argv = io.StringIO(), sys.argv
    sys.argv = [f"python -m jobs.{job}", "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.main()
    finally:
        sys.argv = argv
    return out.getvalue()


def test_every_readme_command_names_a_job_flags_it_takes_and_configs_that_exist():
    commands = readme_commands()
    assert len(commands) >= 14 and {job for job, _ in commands} >= {"precompute", "train", "generate", "evaluate",
                                                                    "inspect", "fit_vae", "pair_decoder"}
    helps: dict[str, str] = {}
    for job, args in commands:
        assert (REPO / "jobs" / f"{job}.py").is_file(), f"the README names a job that does not exist: {job}"
        text = helps.setdefault(job, job_help(job))
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", text), f"jobs.{job} takes no {flag} (README: {args})"
        for config in (b for a, b in zip(args, args[1:]) if a == "--config"):
            assert (REPO / config).is_file(), f"the README's {config} does not exist"


def markdown_links(text: str) -> list[str]:
    """The targets of the inline markdown links `[text](target)` and images `![alt](target)` in `text`, outside code
    blocks and code spans (a link's text may span lines)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target.split()[0] for target in re.findall(r"\]\(([^)\s]+(?:\s+\"[^\"]*\")?)\)", text)]


def test_every_relative_link_in_the_readme_and_docs_points_to_something_that_exists():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked, broken = 0, []
    for page in pages:
        for target in markdown_links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # http(s):, mailto:, in-page
                continue
            path = target.split("#")[0]
            checked += 1
            if not (page.parent / path).resolve().exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert checked >= 20, f"only {checked} relative links found: is the link pattern still right?"
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_readme_stays_a_short_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 230, f"README.md has {len(lines)} lines: move details into docs/ (the limit is 230)"


def integration_tier() -> set[str]:
    """The tests marked `integration`, read from the sources: a module's `pytestmark` names the file, a decorator
    the test."""
    import ast

    found = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and "pytestmark" in [getattr(t, "id", None) for t in node.targets] \
                    and "integration" in ast.unparse(node.value):
                found.add(path.name)
            elif isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "pytest.mark.integration"
                                                           for d in node.decorator_list):
                found.add(f"{path.name}::{node.name}")
    return found


def test_the_integration_tier_is_the_one_docs_list_and_ci_runs_both_tiers():
    """`make test` leaves the integration tier out: the table in docs/install.md is what it leaves, and CI runs it."""
    text = (REPO / "docs" / "install.md").read_text()
    listed = set(re.findall(r"^\| `(test_[^`]+)` \|", text, re.M))
    assert listed == integration_tier() and len(listed) >= 10
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test " in ci and "make test-integration" in ci
    makefile = (REPO / "Makefile").read_text()
    assert '-m "not integration"' in makefile and "-m integration" in makefile


def test_the_readme_commands_run_as_written_in_a_fresh_shell_after_make_install():
    """What the README says to type before its job commands (activating .venv) makes both spellings work in a shell
    that has nothing of this session: no .venv on PATH, no PYTHONPATH."""
    text = (REPO / "README.md").read_text()
    activate = re.search(r"`(source \.venv/bin/activate)`", text)
    assert activate, "the README no longer says how its commands find the venv"
    assert (REPO / ".venv" / "bin" / "activate").is_file(), "make install makes .venv"
    script = f"{activate.group(1)} && ebd --version && python -m jobs.generate --help >/dev/null && ebd train --help"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    result = subprocess.run(["bash", "--noprofile", "--norc", "-c", script], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ebd ") and "usage: ebd train" in result.stdout
