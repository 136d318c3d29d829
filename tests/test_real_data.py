"""On the real Fashion-MNIST files, where the machine has them (Debian's dataset-fashion-mnist)."""

import pandas as pd
import pytest

from csnet import data

try:
    data.locate(data.DATASETS["fashion"])
    HAVE_FASHION = True
except Exception:
    HAVE_FASHION = False

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def _test_accuracy(run):
    m = pd.read_csv(run / "metrics.csv")
    rows = m[(m.split == "test") & (m.metric == "accuracy") & (m.epoch == m.epoch.max())]
    return dict(zip(rows.task, rows.value))


def test_real_files_have_the_official_shapes():
    d = data.load(data.DataConfig(), ["fine", "coarse"])
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.train.images.shape[1:] == (1, 28, 28)
    # Fashion-MNIST's pixel mean is about 72.9 / 255 of full scale
    assert 70 < d.mean < 76


def test_one_epoch_of_cross_stitch_on_6000_images_learns_both_tasks(cli, tmp_path):
    """The pipeline issue's bar: above 70% (fine) and 85% (coarse) after one epoch on 6,000 images."""
    code, _, err = cli("train", "--stitch", "all", "--train-size", "6000", "--epochs", "1", "--quiet",
                       "--out", tmp_path / "cs")
    assert code == 0, err
    acc = _test_accuracy(tmp_path / "cs")
    assert acc["fine"] > 0.70 and acc["coarse"] > 0.85, acc


@pytest.mark.slow
def test_pretrain_stitch_train_on_real_data(cli, tmp_path):
    quick = ["--train-size", "6000", "--epochs", "1", "--quiet"]
    for task in ("fine", "coarse"):
        assert cli("pretrain", "--task", task, *quick, "--out", tmp_path / task)[0] == 0
    assert cli("stitch", tmp_path / "fine", tmp_path / "coarse", "--out", tmp_path / "stitched")[0] == 0
    assert cli("train", "--from", tmp_path / "stitched", *quick, "--out", tmp_path / "cs")[0] == 0
    acc = _test_accuracy(tmp_path / "cs")
    assert acc["fine"] > 0.70 and acc["coarse"] > 0.85, acc


@pytest.mark.filterwarnings("ignore:.*image decoding and encoding capabilities of TorchVision")
def test_the_example_folder_of_coloured_items_trains_with_its_four_tasks(cli, tmp_path):
    from torchvision.io import decode_image

    from csnet.examples import write_folder

    root = write_folder(tmp_path / "folder", n=120)
    table = pd.read_csv(root / "labels.csv")
    assert list(table.columns) == ["image", "item", "colour", "ink", "mask"] and len(table) == 120
    sizes = {tuple(decode_image(str(root / p)).shape) for p in table.image[:2]}
    assert sizes == {(3, 32, 32), (3, 40, 40)}  # two cameras
    again = write_folder(tmp_path / "again", n=120)
    assert (again / "labels.csv").read_text() == (root / "labels.csv").read_text()  # seeded: the same folder
    code, out, err = cli("train", "--dataset", f"folder:{root}", "--tasks", "item,colour,ink,mask", "--image-size",
                         "32", "--quiet", "--out", tmp_path / "r")
    assert code == 0, err
    assert "item (classification), colour (classification), ink (regression), mask (segmentation)" in out
