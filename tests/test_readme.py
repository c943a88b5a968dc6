"""The README's "Python API" example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no ```python block"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {}
        exec(compile(python_api_example(), str(README), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    report = namespace["report"]
    assert report["fPR"] > 0  # the example prunes
    assert "accuracy" in capsys.readouterr().out
    assert (tmp_path / "runs" / "api-example" / "deploy" / "model.pt2").is_file()
    assert namespace["model"].spec() == namespace["net"].spec()
