"""--augment: flips and crops move per-pixel targets with their images, are seeded by place in the run,
train and resume exactly through the CLI, and never touch evaluation."""

import json

import pandas as pd
import pytest
import torch

from csnet.augment import augment, generator, parse
from csnet.errors import UsageError
from test_folder import COMMON, make_folder
from test_resume import resumes_exactly


def batch(n=16, side=12):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, side, side, generator=g)
    # targets that are functions of the image's pixels: they must stay so after any flip or crop
    return images, {"seg": (images[:, 0] > 0).to(torch.uint8), "depth": images[:, 1].exp(),
                    "cls": torch.arange(n)}


def test_targets_move_with_their_images_and_the_border_is_unlabelled():
    images, labels = batch()
    out, got = augment(images, labels, {"seg", "depth"}, ("flip", "crop"), generator(0, 1, 1))
    assert out.shape == images.shape and got["seg"].dtype == torch.uint8
    blank = got["seg"] == 255
    assert blank.any() and torch.equal(blank, torch.isnan(got["depth"]))  # the border a crop brought in
    assert bool((out[:, :, :][blank.unsqueeze(1).expand_as(out)] == 0).all())  # the fill there (0 by default)
    inside = ~blank
    assert torch.equal(got["seg"][inside], (out[:, 0] > 0).to(torch.uint8)[inside])
    assert torch.allclose(got["depth"][inside], out[:, 1].exp()[inside])
    assert torch.equal(got["cls"], labels["cls"])  # per-sample targets are not touched
    assert not torch.equal(out, images)
    mean = torch.tensor([1.5, -2.0, 0.25])
    filled, cut = augment(images, labels, {"seg"}, ("crop",), generator(0, 1, 1), fill=mean.view(3, 1, 1))
    border = (cut["seg"] == 255).unsqueeze(1).expand_as(filled)
    assert torch.equal(filled[border], mean.view(1, 3, 1, 1).expand_as(filled)[border])  # the inputs' mean


def test_draws_depend_on_the_place_in_the_run_only():
    images, labels = batch()
    a, _ = augment(images, labels, {"seg"}, ("flip", "crop"), generator(3, 2, 5))
    b, _ = augment(images, labels, {"seg"}, ("flip", "crop"), generator(3, 2, 5))
    c, _ = augment(images, labels, {"seg"}, ("flip", "crop"), generator(3, 2, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flipped, _ = augment(images, labels, set(), ("flip",), generator(0, 1, 1))
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < len(images)  # some, per sample


def test_augment_names():
    assert parse("none") == () and parse("crop,flip") == ("crop", "flip")
    with pytest.raises(UsageError, match="--augment takes none or a comma-separated list of flip, crop"):
        parse("rotate")


def test_an_augmented_folder_run_trains_resumes_exactly_and_evaluates_plainly(cli, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", n=60)
    args = ["train", "--dataset", f"folder:{root}", "--tasks", "colour,item", *COMMON, "--augment", "flip,crop"]
    resumes_exactly(cli, [*args, "--epochs", "2"], tmp_path / "resume", monkeypatch, 3)
    code, _, err = cli(*args, "--epochs", "1", "--out", tmp_path / "plain-check")
    assert code == 0, err
    assert json.loads((tmp_path / "plain-check" / "config.json").read_text())["train"]["augment"] == "flip,crop"
    m = pd.read_csv(tmp_path / "plain-check" / "metrics.csv")
    test_score = m[(m.split == "test") & (m.task == "mean") & (m.metric == "score")].value.item()
    code, out, err = cli("eval", tmp_path / "plain-check")
    e = pd.read_csv(tmp_path / "plain-check" / "eval.csv")
    assert e[(e.task == "mean") & (e.metric == "score")].value.item() == pytest.approx(test_score, abs=1e-6)
    pd.DataFrame({"f0": range(40), "f1": range(40), "y": [i % 2 for i in range(40)]}).to_csv(tmp_path / "t.csv",
                                                                                             index=False)
    code, _, err = cli("train", "--augment", "flip", "--dataset", f"csv:{tmp_path / 't.csv'}", "--tasks", "y",
                       "--stitch", "none", "--out", tmp_path / "table")
    assert code == 2 and "--augment flips and crops images" in err and not (tmp_path / "table").exists()
