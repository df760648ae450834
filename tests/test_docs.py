"""Every ```python block in README.md and docs/*.md runs (in a temporary directory), so the docs stay true."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks():
    for document in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer(document.read_text())):
            yield pytest.param(match.group(1), id=f"{document.relative_to(ROOT)}#{number}")


@pytest.mark.parametrize("code", python_blocks())
def test_code_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_block__"})


def test_documents_have_code_blocks():
    assert sum(1 for _ in python_blocks()) >= 3
