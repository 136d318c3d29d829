"""--dataset folder:PATH: real PNG files of two sizes and kinds, a labels.csv, masks; the whole pipeline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.io import write_png

from conftest import synthetic_images

# torchvision 0.29 says, on every PNG written or read, that torchcodec will take its codecs over one day
pytestmark = pytest.mark.filterwarnings("ignore:.*image decoding and encoding capabilities of TorchVision")


def make_folder(root, n=120, seed=0):
    """n images: RGB 20x20 (first half) and gray 24x24; a Fashion-like item whose colour channel is the class,
    brightness a number, and a mask PNG marking the item's pixels (1) against the background (0)."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    (root / "img").mkdir()
    (root / "mask").mkdir()
    rows = []
    items = synthetic_images(torch.randint(0, 10, (n,), generator=g), seed)
    for i in range(n):
        colour = i % 3
        side = 20 if i < n // 2 else 24
        item = torch.nn.functional.interpolate(items[i][None, None].float(), size=(side, side))[0, 0]
        bright = float(torch.rand((), generator=g)) * 0.8 + 0.2
        mask = (item > 120).to(torch.uint8)
        if i < n // 2:
            image = torch.zeros(3, side, side)
            image[colour] = item * bright
        else:
            image = (item * bright * (colour + 1) / 3)[None]
        write_png(image.clamp(0, 255).to(torch.uint8), str(root / "img" / f"{i}.png"))
        write_png(mask[None], str(root / "mask" / f"{i}.png"))
        rows.append({"image": f"img/{i}.png", "colour": ["red", "green", "blue"][colour],
                     "brightness": round(bright, 4), "item": f"mask/{i}.png"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


COMMON = ["--image-size", "16", "--batch-size", "32", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("f") / "data")


def test_a_folder_of_images_trains_with_classification_regression_and_segmentation(cli, folder, tmp_path):
    data = f"folder:{folder}"
    code, out, err = cli("train", "--dataset", data, "--tasks", "colour,brightness,item", *COMMON, "--epochs", "3",
                         "--out", tmp_path / "r")
    assert code == 0, err
    assert "colour (classification), brightness (regression), item (segmentation)" in out
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model"]["in_channels"] == 3 and config["model"]["image_size"] == 16
    assert config["model"]["backbone"] == "fcn" and config["model"]["num_classes"] == [3, 1, 2]
    m = pd.read_csv(tmp_path / "r" / "metrics.csv").set_index(["epoch", "split", "task", "metric"]).value
    assert {("colour", "accuracy"), ("brightness", "r2"), ("item", "miou")} <= {(t, k) for _, _, t, k in m.index}
    code, out, err = cli("eval", tmp_path / "r")  # per-channel statistics and sizes from the run alone
    assert code == 0, err
    assert "miou" in out
    code, _, err = cli("train", "--config", tmp_path / "r" / "config.json", "--epochs", "1", "--out", tmp_path / "again")
    assert code == 0, err  # the same folder, tasks and --image-size
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["data"] == config["data"] and again["model"] == config["model"]


def test_pretrain_stitch_from_compare_and_resume_on_a_folder(cli, folder, tmp_path, monkeypatch):
    from test_resume import resumes_exactly

    data = f"folder:{folder}"
    for task in ("colour", "item"):
        code, _, err = cli("pretrain", "--dataset", data, "--task", task, *COMMON, "--out", tmp_path / task)
        assert code == 0, err
    assert cli("stitch", tmp_path / "colour", tmp_path / "item", "--out", tmp_path / "st")[0] == 0
    code, _, err = cli("train", "--from", tmp_path / "st", *COMMON, "--out", tmp_path / "tr")
    assert code == 0, err
    code, _, err = cli("compare", tmp_path / "colour", tmp_path / "tr", "--reference", tmp_path / "colour",
                       "--reference", tmp_path / "item", "--out", tmp_path / "cmp")
    assert code == 0, err
    resumes_exactly(cli, ["train", "--dataset", data, "--tasks", "colour,item", *COMMON, "--epochs", "2"],
                    tmp_path / "resume", monkeypatch, 4)


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "img" / "3.png").unlink(), "3.png: image file not found"),
    (lambda r: (r / "img" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"), "4.png: not a readable image"),
    (lambda r: write_png(torch.zeros(1, 5, 5, dtype=torch.uint8), str(r / "mask" / "7.png")),
     "7.png: (5, 5) pixels, but its image 7.png has (24, 24); a per-pixel target must match its image"),
    (lambda r: pd.read_csv(r / "labels.csv").rename(columns={"image": "file"}).to_csv(r / "labels.csv", index=False),
     "no 'image' column naming the image files"),
    (lambda r: pd.read_csv(r / "labels.csv").assign(image=lambda d: d.image.where(d.index != 5, "img/0.png"))
     .to_csv(r / "labels.csv", index=False), "'img/0.png' is named by more than one row"),
])
def test_bad_folders_are_one_line_and_write_nothing(cli, tmp_path, damage, message):
    root = make_folder(tmp_path / "data", n=12)
    damage(root)
    code, _, err = cli("train", "--dataset", f"folder:{root}", "--tasks", "colour,item", *COMMON,
                       "--out", tmp_path / "r")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "r").exists()


def test_a_label_table_elsewhere_and_another_image_column(cli, folder, tmp_path):
    """--labels FILE and --image-column NAME: the paths in the table stay relative to the data set's folder."""
    tables = tmp_path / "tables"
    tables.mkdir()
    pd.read_csv(folder / "labels.csv").rename(columns={"image": "file"}).iloc[:60].to_csv(tables / "first.csv",
                                                                                          index=False)
    data = ["--dataset", f"folder:{folder}", "--labels", tables / "first.csv", "--image-column", "file"]
    code, out, err = cli("train", *data, "--tasks", "colour,item", *COMMON, "--epochs", "1", "--out", tmp_path / "r")
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data"]["labels"] == str(tables / "first.csv") and config["data"]["image_column"] == "file"
    assert config["data_stats"]["files"]["labels"]["path"] == str(tables / "first.csv")
    assert config["data_stats"]["train"] + config["data_stats"]["val"] + config["data_stats"]["test"] == 60
    code, out, err = cli("eval", tmp_path / "r")  # the table and column come from the run
    assert code == 0, err
    for args, message in (
            (["--labels", tmp_path / "none.csv"], f"--labels {tmp_path / 'none.csv'}: no such file"),
            (["--labels", tables / "first.csv"], "no 'image' column naming the image files"),
            (["--image-column", "picture"], "no 'picture' column naming the image files"),
    ):
        code, _, err = cli("train", "--dataset", f"folder:{folder}", *args, *COMMON, "--out", tmp_path / "x")
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("train", "--labels", tables / "first.csv", "--out", tmp_path / "x")
    assert code == 2 and "--labels applies to --dataset folder:PATH" in err
    assert not (tmp_path / "x").exists()


def test_images_of_two_sizes_need_an_image_size(cli, folder, tmp_path):
    code, _, err = cli("train", "--dataset", f"folder:{folder}", "--tasks", "colour", "--quiet", "--out", tmp_path / "r")
    assert code == 2 and "the images are not all of one size" in err and "--image-size S (or H,W)" in err
    code, _, err = cli("train", "--dataset", f"folder:{folder}", "--image-size", "16,0", "--out", tmp_path / "r")
    assert code == 2 and "--image-size takes S or H,W, each from 1 to 65535 pixels" in err


@pytest.mark.parametrize("backbone", ["fcn", "convnet"])
def test_images_resized_to_a_rectangle_train_evaluate_and_continue(cli, folder, tmp_path, backbone):
    tasks = "colour,brightness,item" if backbone == "fcn" else "colour,brightness"
    args = ["--dataset", f"folder:{folder}", "--tasks", tasks, "--image-size", "12,20", "--backbone", backbone]
    code, out, err = cli("train", *args, *COMMON[2:], "--out", tmp_path / "r")
    assert code == 0, err
    assert "at 12x20" in out
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data"]["image_size"] == [12, 20] and config["model"]["image_size"] == [12, 20]
    code, _, err = cli("eval", tmp_path / "r")
    assert code == 0, err
    code, _, err = cli("train", "--from", tmp_path / "r", "--quiet", "--out", tmp_path / "again")  # takes 12x20
    assert code == 0, err
    code, _, err = cli("train", "--from", tmp_path / "r", "--image-size", "20,12", "--quiet", "--out", tmp_path / "x")
    assert code == 2 and "the network expects 3x12x20 images, the data set has 3x20x12" in err


def test_what_a_review_found_is_refused_with_a_hint_or_handled(cli, tmp_path):
    root = make_folder(tmp_path / "data", n=12)
    table = pd.read_csv(root / "labels.csv")
    # a binary mask stored as 0/255: 255 means "no label", so it would train a task with one class
    for i in range(12):
        write_png((torch.arange(400).view(1, 20, 20) % 2 * 255).to(torch.uint8) if i < 6 else
                  (torch.arange(576).view(1, 24, 24) % 2 * 255).to(torch.uint8), str(root / "mask" / f"{i}.png"))
    code, _, err = cli("train", "--dataset", f"folder:{root}", "--tasks", "item", *COMMON, "--stitch", "none",
                       "--out", tmp_path / "r")
    assert code == 2 and "255, which marks unlabelled pixels; store a binary mask as 0 and 1" in err
    # the same bad masks do not stop a run that does not use them
    code, _, err = cli("train", "--dataset", f"folder:{root}", "--tasks", "colour", *COMMON, "--stitch", "none",
                       "--epochs", "1", "--out", tmp_path / "ok")
    assert code == 0, err
    # a path that leaves the folder
    table.loc[2, "image"] = "../elsewhere.png"
    table.to_csv(root / "labels.csv", index=False)
    code, _, err = cli("train", "--dataset", f"folder:{root}", "--tasks", "colour", *COMMON, "--out", tmp_path / "r")
    assert code == 1 and "'../elsewhere.png' is not a path inside" in err
    code, _, err = cli("train", "--dataset", f"folder:{root}", "--image-size", "0", "--out", tmp_path / "r")
    assert code == 2 and "--image-size" in err and not (tmp_path / "r").exists()


def test_a_split_column_fixes_the_splits_and_16_bit_images_are_scaled(cli, tmp_path):
    root = make_folder(tmp_path / "data", n=30)
    table = pd.read_csv(root / "labels.csv")
    table["split"] = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    table.to_csv(root / "labels.csv", index=False)
    from PIL import Image  # torchvision writes 8-bit PNGs only; Pillow (a torchvision dependency) writes 16-bit

    deep = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 150)  # up to 59,850 of 65,535
    Image.fromarray(deep).save(root / "img" / "0.png")
    from csnet import data as data_lib

    loaded = data_lib.load(data_lib.DataConfig(dataset=f"folder:{root}", image_size=16), ["colour"])
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (20, 5, 5)
    assert loaded.train.images.dtype == torch.uint8 and int(loaded.train.images.max()) > 200  # scaled, not wrapped
    code, _, err = cli("train", "--dataset", f"folder:{root}", "--tasks", "colour", *COMMON, "--stitch", "none", "--val-size", "3",
                       "--out", tmp_path / "r")
    assert code == 2 and "has a 'split' column, which fixes the validation set" in err
