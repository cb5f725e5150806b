"""The seams the layout promises: pipeline/'s layers hold (import-linter's contracts in pyproject.toml), every sampler
is a pure function with one signature, no module outside pipeline/models branches on a model kind's name, no module is
over 450 lines, and no function takes more than 8 positional parameters."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_layer_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_sampler_has_the_one_signature_and_cites_its_algorithm():
    from pipeline.sampling.samplers import SAMPLERS

    signatures = {name: list(inspect.signature(fn).parameters) for name, fn in SAMPLERS.items()}
    assert set(map(tuple, signatures.values())) == {("model", "z", "settings", "generator", "callback")}, signatures
    assert all((fn.__doc__ or "").strip() for fn in SAMPLERS.values())


def test_no_module_outside_the_models_package_branches_on_a_model_kind():
    from pipeline.models import KINDS

    kinds = "|".join(map(re.escape, KINDS))
    branch = re.compile(rf"""(==|!=|\bin\b)\s*\(?["']({kinds})["']|["']({kinds})["']\s*(==|!=)"""
                        rf"""|isinstance\([^)]*\b({kinds})\b""")
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "pipeline").rglob("*.py")
                 if "models" not in path.relative_to(REPO / "pipeline").parts[:1]
                 for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert not offenders, offenders


def test_no_module_in_the_library_is_over_450_lines():
    """A module that grows past this holds more than one concept: split it (docs/architecture.md)."""
    long = {str(path.relative_to(REPO)): n for path in (REPO / "pipeline").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 450}
    assert not long, long


def test_no_function_in_the_library_takes_more_than_8_positional_parameters():
    """Past eight, a call's meaning hangs on argument order: the rest are keyword-only (a bare `*`), or travel
    together in a small frozen spec (e.g. generation.stages.SamplerSpec). `self` / `cls` do not count."""
    import ast

    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            names = [a.arg for a in node.args.posonlyargs + node.args.args]
            positional = len(names) - (names[:1] in (["self"], ["cls"]))
            where = f"{path.relative_to(REPO).as_posix()}:{node.name}"
            if positional > 8:
                offenders.append(f"{where} (line {node.lineno}: {positional} positional)")
    assert not offenders, offenders
