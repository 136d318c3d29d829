"""The README's "from Python" example, run exactly as written: its lab.py and its shell lines, in a fresh folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_the_from_python_example_runs_as_written(tmp_path):
    part = section("Your own data and networks, from Python")
    python, shell = re.findall(r"```python\n(.*?)```", part, re.S), re.findall(r"```sh\n(.*?)```", part, re.S)
    assert len(python) == 1 and len(shell) == 1
    (tmp_path / "lab.py").write_text(python[0])
    # the venv's python and csnet first on PATH, as after `make install`; nothing else from this checkout
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    outputs = []
    for line in shell[0].strip().splitlines():
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    for name in ("lab-independent", "lab-stitched"):
        run = tmp_path / "runs" / name
        assert {"config.json", "metrics.csv", "model.pt", "plots"} <= {p.name for p in run.iterdir()}
    assert "lab-stitched" in outputs[1] and (tmp_path / "runs" / "lab-compare" / "REPORT.md").is_file()
    assert (tmp_path / "runs" / "lab-stitched" / "alpha.csv").is_file()  # its units were trained and logged
    # eval rebuilt the network from lab:stitched and read the data from lab:make_data: the run's own test score
    m = pd.read_csv(tmp_path / "runs" / "lab-stitched" / "metrics.csv")
    val = m[(m.split == "val") & (m.task == "mean") & (m.metric == "score")]
    best = int(val.epoch[val.value.idxmax()])
    want = m[(m.epoch == best) & (m.split == "test") & (m.task == "mean") & (m.metric == "score")].value.item()
    e = pd.read_csv(tmp_path / "runs" / "lab-stitched" / "eval.csv")
    assert e[(e.task == "mean") & (e.metric == "score")].value.item() == pytest.approx(want, abs=1e-6)
