"""csnet.fit: your own network and Datasets through csnet's loop, into a run folder that the command line
evaluates, compares and resumes; its mistakes are one UsageError each."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

import csnet
from csnet.errors import UsageError
from test_resume import values
from test_streaming import DATASET


class TwoHeads(nn.Module):
    """Not a csnet network: a plain module whose forward returns {task: output}."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.shape, self.ink = nn.Linear(128, 10), nn.Linear(128, 1)

    def forward(self, x):
        h = self.trunk(x)
        return {"shape": self.shape(h), "ink": self.ink(h)}


def two_heads():
    torch.manual_seed(0)
    return TwoHeads()


@pytest.fixture
def lab(tmp_path, monkeypatch):
    (tmp_path / "lab_data.py").write_text(DATASET + "\n\nfrom test_fit import two_heads  # noqa: E402,F401\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import lab_data

    yield lab_data
    import sys

    sys.modules.pop("lab_data", None)


def datasets(lab):
    return {s: lab.make(s) for s in ("train", "val", "test")}


def test_fit_writes_a_run_the_command_line_evaluates_and_resumes(cli, lab, tmp_path):
    tasks = {"shape": ("classification", 10), "ink": "regression"}
    run = csnet.fit(two_heads(), **datasets(lab), tasks=tasks, out="full", epochs=3, batch_size=16, quiet=True,
                    dataset="lab_data:make", network="lab_data:two_heads")
    assert run.resolve() == tmp_path / "full" and (run / "model.pt").is_file() and (run / "plots").is_dir()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["arch"] == "custom" and config["model"]["network"] == "lab_data:two_heads"
    # stopped after two epochs, continued by the command line to three: the uninterrupted run's numbers
    csnet.fit(two_heads(), **datasets(lab), tasks=tasks, out="part", epochs=2, batch_size=16, quiet=True,
              dataset="lab_data:make", network="lab_data:two_heads", keep_last=True)
    code, _, err = cli("train", "--resume", "part", "--epochs", "3")
    assert code == 2 and "name it on this command line: --dataset lab_data:make" in err
    code, _, err = cli("train", "--resume", "part", "--epochs", "3", "--dataset", "lab_data:make")
    assert code == 2 and "name it on this command line: --backbone lab_data:two_heads" in err
    code, _, err = cli("train", "--resume", "part", "--epochs", "3", "--backbone", "lab_data:two_heads",
                       "--dataset", "lab_data:make", "--quiet")
    assert code == 0, err
    pd.testing.assert_frame_equal(values(tmp_path / "part"), values(run))
    code, _, err = cli("eval", "full", "--dataset", "lab_data:make", "--backbone", "lab_data:two_heads")
    assert code == 0, err
    code, out, err = cli("compare", "full", "part", "--out", "cmp")
    assert code == 0, err


def test_fit_resumes_from_python_and_takes_the_dataset_function_alone(lab, tmp_path):
    tasks = {"shape": ("classification", 10), "ink": "regression"}  # two of the Dataset's three
    part = csnet.fit(two_heads(), dataset="lab_data:make", tasks=tasks, out="part", epochs=1, batch_size=16,
                     quiet=True, keep_last=True, seed=3)
    assert json.loads((part / "config.json").read_text())["data"]["dataset"] == "lab_data:make"
    csnet.fit(two_heads(), dataset="lab_data:make", tasks=tasks, out="part", epochs=2, resume=True, quiet=True)
    ref = csnet.fit(two_heads(), dataset="lab_data:make", tasks=tasks, out="ref", epochs=2, batch_size=16,
                    quiet=True, seed=3)
    pd.testing.assert_frame_equal(values(part), values(ref))


def test_fit_without_a_recorded_network_says_how_to_evaluate_it(cli, lab):
    csnet.fit(two_heads(), **datasets(lab), tasks={"shape": ("classification", 10), "ink": "regression"}, out="r",
              quiet=True, batch_size=16)
    code, _, err = cli("eval", "r", "--dataset", "lab_data:make")
    assert code == 2 and "without network='module.path:function'" in err
    code, _, err = cli("eval", "r")
    assert code == 2 and "trained from Python (csnet.fit) on Datasets csnet cannot make again" in err


@pytest.mark.parametrize("kwargs, message", [
    ({"batchsize": 16}, "unknown setting(s) batchsize; valid: "),
    ({"train": None}, "needs train=, val= and test= Datasets"),
    ({"tasks": {"shape": "colour"}}, "unknown task kind 'colour'"),
    ({"lr": -1.0}, "--lr"),
])
def test_fit_mistakes_are_usage_errors_before_anything_is_written(lab, tmp_path, kwargs, message):
    args = {**datasets(lab), "out": "r", "quiet": True, "tasks": {"shape": ("classification", 10),
                                                                  "ink": "regression"}, **kwargs}
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        csnet.fit(two_heads(), **args)
    assert not (tmp_path / "r").exists()


class Forgetful(TwoHeads):
    def forward(self, x):
        return {"shape": super().forward(x)["shape"]}


class Bare(TwoHeads):
    def forward(self, x):
        return super().forward(x)["shape"]


@pytest.mark.parametrize("net, message", [
    (Forgetful(), "the network returns no output for task ink (it returns: shape)"),
    (Bare(), "the network's forward must return {task: output}, it returned Tensor"),
])
def test_a_network_whose_outputs_do_not_fit_is_refused_before_anything_is_written(lab, tmp_path, net, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")
                       .replace("}", r"\}")):
        csnet.fit(net, **datasets(lab), tasks={"shape": ("classification", 10), "ink": "regression"}, out="r",
                  quiet=True)
    assert not (tmp_path / "r").exists()


def test_fit_checks_target_shapes_and_resumes_with_the_runs_own_epochs(lab, tmp_path):
    tasks = {"shape": ("classification", 10), "ink": "regression"}
    with pytest.raises(csnet.errors.CsnetError, match="task mask \\(segmentation\\): train targets have shape"):
        small = {s: Shrunk(lab.make(s)) for s in ("train", "val", "test")}
        csnet.fit(TwoHeadsAndMask(), **small, out="geo", quiet=True)
    assert not (tmp_path / "geo").exists()
    csnet.fit(two_heads(), **datasets(lab), tasks=tasks, out="cos", epochs=3, batch_size=16, quiet=True,
              keep_last=True, lr_schedule="cosine")
    with pytest.raises(UsageError, match="uses a cosine schedule fixed by its epochs=3; resume it without epochs="):
        csnet.fit(two_heads(), **datasets(lab), tasks=tasks, out="cos", epochs=4, resume=True, quiet=True)
    with pytest.raises(UsageError, match="has finished its 3 epochs"):  # the run's own 3, not fit's default
        csnet.fit(two_heads(), **datasets(lab), tasks=tasks, out="cos", resume=True, quiet=True)


class TwoHeadsAndMask(TwoHeads):
    def __init__(self):
        super().__init__()
        self.mask = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {**super().forward(x), "mask": self.mask(x)}


class Shrunk(torch.utils.data.Dataset):
    """Images cut to 14x14, masks left at 28x28: targets that do not fit their images."""

    def __init__(self, base):
        self.base, self.tasks = base, base.tasks

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, targets = self.base[i]
        return image[:, :14, :14], targets
