"""The README's quick start runs as written and prints what the README shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_quick_start_runs_and_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"It prints.*?```\n(.*?)```", section, re.S).group(1).splitlines()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "quickstart.py", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(shown)
    numbers = re.compile(r"\d+\.\d+")
    for got, want in zip(printed, shown):  # the same lines; figures within rounding of another CPU
        assert numbers.sub("#", got) == numbers.sub("#", want)
    for line in printed[3:6]:  # each context's error is lowest through its own ticket
        name, errors = line.split(":")
        values = dict(zip(errors.split()[::2], map(float, errors.split()[1::2])))
        assert min(values, key=values.get) == name.strip()
    assert printed[-1] == shown[-1] == "(0.5, 0.8) True"
    assert (tmp_path / "tickets" / "tickets.json").is_file() and (tmp_path / "runs" / "quickstart" / "identity.json").is_file()
