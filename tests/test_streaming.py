"""Data read item by item (``--stream``, a DataLoader with workers) trains exactly as data held in memory, resumes
exactly, and is chosen by size on its own; your own Dataset (``--dataset module.path:function``) is imported
only when named, and its faults are one line each."""

import json
import sys
import textwrap

import pandas as pd
import pytest

from test_folder import COMMON, make_folder
from test_resume import resumes_exactly, values

pytestmark = pytest.mark.filterwarnings("ignore:.*image decoding and encoding capabilities of TorchVision")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("s") / "data", n=80)


def test_streamed_and_in_memory_folders_give_the_same_run(cli, folder, tmp_path):
    args = ["train", "--dataset", f"folder:{folder}", "--tasks", "colour,brightness,item", *COMMON, "--epochs", "2"]
    code, out, err = cli(*args, "--no-stream", "--out", tmp_path / "memory")
    assert code == 0, err
    assert "data: 80 images held in memory" in out
    code, out, err = cli(*args, "--stream", "--workers", "2", "--out", tmp_path / "stream")
    assert code == 0, err
    assert "read from disk as they are needed, by 2 worker process(es)" in out
    pd.testing.assert_frame_equal(values(tmp_path / "stream"), values(tmp_path / "memory"))
    saved = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert saved["data"]["stream"] is True and saved["data"]["workers"] == 2
    # the statistics travel in the checkpoint: eval of the streamed run reads the same numbers back
    code, _, err = cli("eval", tmp_path / "stream")
    assert code == 0, err
    m, e = pd.read_csv(tmp_path / "stream" / "metrics.csv"), pd.read_csv(tmp_path / "stream" / "eval.csv")
    best = m[(m.split == "val") & (m.task == "mean") & (m.metric == "score")].value.idxmax()
    epoch = m.loc[best, "epoch"]
    want = m[(m.epoch == epoch) & (m.split == "test") & (m.task == "mean") & (m.metric == "score")].value.item()
    assert e[(e.task == "mean") & (e.metric == "score")].value.item() == pytest.approx(want, abs=1e-6)


def test_a_streamed_run_resumes_exactly(cli, folder, tmp_path, monkeypatch):
    args = ["train", "--dataset", f"folder:{folder}", "--tasks", "colour,item", *COMMON, "--epochs", "2", "--stream",
            "--workers", "1", "--starve", "colour=20"]
    resumes_exactly(cli, args, tmp_path, monkeypatch, 2)


def test_the_cut_over_is_by_size_and_printed(cli, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CSNET_MEMORY_LIMIT", "10000")  # 80 images of 3x16x16 plus masks take more
    code, out, err = cli("train", "--dataset", f"folder:{folder}", "--tasks", "colour,item", *COMMON, "--workers", "0",
                         "--out", tmp_path / "r")
    assert code == 0, err
    assert "read from disk as they are needed, by 0 worker process(es): more than the 0.0 GB kept in memory" in out
    code, _, err = cli("train", "--stream", "--out", tmp_path / "idx")
    assert code == 2 and "--stream applies to --dataset folder:PATH and your own module.path:function" in err


DATASET = textwrap.dedent('''
    """A user's own data set: coloured Fashion-like squares, a class, a number and a mask per image."""
    import torch

    from conftest import synthetic_images


    class Squares(torch.utils.data.Dataset):
        tasks = {"shape": ("classification", 10), "ink": "regression", "mask": ("segmentation", 2)}

        def __init__(self, split, n):
            seed = {"train": 0, "val": 1, "test": 2}[split]
            g = torch.Generator().manual_seed(seed)
            self.labels = torch.randint(0, 10, (n,), generator=g)
            self.images = synthetic_images(self.labels, seed)[:, None].expand(-1, 3, -1, -1).contiguous()
            self.images[:, 1] //= 2

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            image = self.images[i]
            return image, {"shape": int(self.labels[i]), "ink": float(image.float().mean()) / 255,
                           "mask": (image[0] > 100).long()}


    def make(split, n="48"):
        return Squares(split, int(n) if split == "train" else 24)


    def broken(split):
        raise FileNotFoundError("no such file: /data/lab/images")


    def not_a_dataset(split):
        return [1, 2, 3]


    class Faulty(Squares):
        def __getitem__(self, i):
            if i == 5:
                raise ValueError("image 5 is corrupt")
            return super().__getitem__(i)


    def faulty(split):
        return Faulty(split, 48)


    class Unlabelled(Squares):
        def __getitem__(self, i):
            return self.images[i], {"ink": 0.5}


    def unlabelled(split):
        return Unlabelled(split, 48)


    class BigClass(Squares):
        def __getitem__(self, i):
            image, targets = super().__getitem__(i)
            return image, {**targets, "shape": 12 if i == 7 else targets["shape"]}


    def big_class(split):
        return BigClass(split, 48)


    class Ragged(Squares):
        def __getitem__(self, i):
            image, targets = super().__getitem__(i)
            return (image[:, :20] if i == 3 else image), targets


    def ragged(split):
        return Ragged(split, 48)


    class WrapAround(Squares):
        def __getitem__(self, i):
            image, targets = super().__getitem__(i)
            return image, {**targets, "mask": targets["mask"] + 256 * (i == 2)}  # 257 would cast to 1


    def wrap_around(split):
        return WrapAround(split, 48)
''')


@pytest.fixture
def own_data(tmp_path, monkeypatch):
    (tmp_path / "lab_data.py").write_text(DATASET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("lab_data", None)  # each test's own module of that name


def test_your_own_dataset_trains_streams_and_is_imported_only_when_named(cli, own_data):
    args = ["--tasks", "shape,ink,mask", "--batch-size", "16", "--quiet", "--device", "cpu", "--epochs", "2"]
    code, out, err = cli("train", "--dataset", "lab_data:make", "--data-option", "n=64", *args, "--out", "memory")
    assert code == 0, err
    assert "shape (classification), ink (regression), mask (segmentation) on lab_data:make (64 train / 24 val / " \
           "24 test)" in out and "data: 112 items held in memory" in out
    code, out, err = cli("train", "--dataset", "lab_data:make", "--data-option", "n=64", *args, "--stream",
                         "--workers", "2", "--out", "stream")
    assert code == 0, err
    pd.testing.assert_frame_equal(values(own_data / "stream"), values(own_data / "memory"))
    saved = json.loads((own_data / "memory" / "config.json").read_text())["data"]
    assert saved["dataset"] == "lab_data:make" and saved["options"] == {"n": "64"}
    # a run folder naming code is data: its data set is imported only when this command line names it
    code, _, err = cli("eval", "memory")
    assert code == 2 and "name it on this command line: --dataset lab_data:make" in err
    code, out, err = cli("eval", "memory", "--dataset", "lab_data:make")
    assert code == 0, err
    code, _, err = cli("train", "--from", "memory", "--epochs", "1", "--quiet", "--out", "again")
    assert code == 2 and "--dataset lab_data:make" in err and not (own_data / "again").exists()
    code, _, err = cli("train", "--resume", "memory", "--dataset", "fashion")
    assert code == 2 and "only names the run's own module.path:function data set" in err


@pytest.mark.parametrize("spec, message", [
    ("lab_data:broken", "--dataset lab_data:broken: broken('train') raised FileNotFoundError: no such file: "
                        "/data/lab/images"),
    ("lab_data:not_a_dataset", "expected a torch.utils.data.Dataset (with __getitem__ and __len__), got list"),
    ("lab_data:missing", "--dataset lab_data:missing: lab_data has no missing"),
    ("no_such_module:make", "--dataset no_such_module:make: cannot import no_such_module"),
    ("lab_data:faulty", "--dataset lab_data:faulty (train): item 5 raised ValueError: image 5 is corrupt"),
    ("lab_data:unlabelled", "--dataset lab_data:unlabelled (train): item 0 has no target 'shape' (it has ink)"),
    ("lab_data:big_class", "--dataset lab_data:big_class (train): item 7: target shape holds 12; a classification "
                           "task of size 10 takes whole class numbers from 0 to 9 (-1: no label)"),
    ("lab_data:ragged", "--dataset lab_data:ragged (train): items"),
    ("lab_data:wrap_around", "--dataset lab_data:wrap_around (train): item 2: target mask holds 256; a segmentation "
                             "task of size 2 takes whole class numbers from 0 to 1 (-1 or 255: no label)"),
])
@pytest.mark.parametrize("stream", [[], ["--stream", "--workers", "2"]], ids=["memory", "stream"])
def test_your_own_dataset_faults_are_one_line(cli, own_data, spec, message, stream):
    tasks = "mask" if "wrap" in spec else "shape"
    code, out, err = cli("train", "--dataset", spec, "--tasks", tasks, "--stitch", "none", *stream, "--out", "r")
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (own_data / "r").exists()


def test_code_named_only_in_a_config_file_is_never_imported(cli, own_data):
    """A downloaded run's config.json is data: --config with it must not import the module it names."""
    (own_data / "evil.py").write_text("open('IMPORTED', 'w').close()\nmake = None\n")
    code, _, err = cli("train", "--dataset", "lab_data:make", "--tasks", "shape,ink", "--quiet", "--out", "r")
    assert code == 0, err
    config = json.loads((own_data / "r" / "config.json").read_text())
    config["data"]["dataset"] = "evil:make"
    (own_data / "r" / "config.json").write_text(json.dumps(config))
    code, _, err = cli("train", "--config", own_data / "r" / "config.json", "--out", "again")
    assert code == 2 and "name it on this command line: --dataset evil:make" in err
    assert not (own_data / "IMPORTED").exists() and not (own_data / "again").exists()


def test_from_a_run_of_your_own_data_keeps_its_options_and_eval_elsewhere_takes_its_splits(cli, own_data):
    args = ["--tasks", "shape,ink", "--quiet", "--batch-size", "16"]
    code, _, err = cli("train", "--dataset", "lab_data:make", "--data-option", "n=40", *args, "--out", "r")
    assert code == 0, err
    code, out, err = cli("train", "--from", "r", "--dataset", "lab_data:make", "--out", "again")
    assert code == 0, err
    assert json.loads((own_data / "again" / "config.json").read_text())["data"]["options"] == {"n": "40"}
    assert "(40 train / 24 val / 24 test)" in out
    # a fashion-like run evaluated on your own data set: its --val-size does not carry over
    code, _, err = cli("train", "--dataset", "lab_data:make", "--data-option", "n=40", *args, "--out", "other")
    code, _, err = cli("eval", "other", "--dataset", "lab_data:make")
    assert code == 0, err


def test_a_streamed_folder_is_decoded_once_before_training(cli, tmp_path, monkeypatch):
    from csnet import folder as folder_source

    root = make_folder(tmp_path / "data", n=40)
    reads = []
    read = folder_source._read_image
    monkeypatch.setattr(folder_source, "_read_image", lambda *a: reads.append(a) or read(*a))
    code, _, err = cli("train", "--dataset", f"folder:{root}", "--tasks", "colour,item", *COMMON, "--stream",
                       "--workers", "2", "--out", tmp_path / "r")  # the workers' reads are their own
    assert code == 0, err
    assert 40 <= len(reads) <= 40 + 5  # the scan, plus the size estimate and a first example or two
