"""The README's Python quick-start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("### In Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "masked: 2 tensors, 160 of 193 parameters" in printed
    assert "(0.5, 0.8) torch.Size([2, 1])" in printed
    assert (tmp_path / "tickets" / "tickets.json").is_file() and (tmp_path / "runs" / "mine" / "identity.json").is_file()
