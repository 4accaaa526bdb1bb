"""README.md's Python example runs as written (against the tiny bundle)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tiny_bundle, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(README.parent)
    for code in blocks:
        code = code.replace('".cache/tiny-bundle"', repr(str(tiny_bundle)))
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "transcript: 'canned question" in out and "text_answer: 'Canned answer" in out
    assert "UserTranscript 'canned question" in out and "AgentText 'Canned answer" in out
    frames = int(re.search(r"\| (\d+) frames of 20 ms", out).group(1))
    assert frames > 0  # the answer's unit span reached the vocoder
