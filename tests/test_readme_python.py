"""README's Python section starts with the short path (load, predict, filter, convert): that exact snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_python_block(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_readme_python_snippet_runs(capsys, monkeypatch):
    code = _first_python_block("Python API")
    assert len([line for line in code.splitlines() if line.strip()]) <= 8, "the short path is at most eight lines"
    monkeypatch.chdir(ROOT)  # the snippet's paths are relative to a clone, as the README's commands are
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    seg, confident, annotations = namespace["seg"], namespace["confident"], namespace["annotations"]
    assert seg.class_names[0] == "circle" and len(seg.segments) > 0
    assert (confident.instances.score >= 0.5).all() and (confident.instances.area >= 16).all()
    assert len(annotations) == len(confident.instances) and all("segmentation" in a for a in annotations)
    assert capsys.readouterr().out.strip()  # it printed the names and scores
