"""docs/errors.md, the catalogue of bad input and faults, cannot fall behind the suite: every
test it names exists, and every case of test_reliability.test_bad_input is in it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from test_reliability import CASES

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "errors.md").read_text()
# `tests/test_x.py::test_name[param]`, or `test_bad_input[case]` (test_reliability's)
NAMED = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)(?:\[([^\]]+)\])?`", DOC)
BAD_INPUT = re.findall(r"`test_bad_input\[([^\]]+)\]`", DOC)


def _test_functions(path: Path) -> dict[str, str]:
    """name -> source of every top-level test function in `path`, its decorators included."""
    lines = path.read_text().splitlines()
    return {n.name: "\n".join(lines[min([n.lineno, *(d.lineno for d in n.decorator_list)]) - 1:n.end_lineno])
            for n in ast.parse("\n".join(lines)).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_named_test_exists():
    assert len(NAMED) >= 30 and len(BAD_INPUT) >= 40
    for file, name, param in NAMED:
        functions = _test_functions(ROOT / file)
        assert name in functions, f"docs/errors.md names {file}::{name}, which does not exist"
        if param:  # the id's words appear in the test's parametrize list
            assert "parametrize" in functions[name] and all(
                part in functions[name] for part in param.split("-")), f"{file}::{name}[{param}]"
    unknown = sorted(set(BAD_INPUT) - set(CASES))
    assert not unknown, f"docs/errors.md lists test_bad_input cases that do not exist: {unknown}"


def test_every_bad_input_case_is_listed():
    missing = sorted(set(CASES) - set(BAD_INPUT))
    assert not missing, f"add these test_bad_input cases to docs/errors.md: {missing}"
