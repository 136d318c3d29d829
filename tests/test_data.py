"""The IDX reader, data location, tasks and splits, on IDX files the tests write."""

import os
from pathlib import Path

import pytest
import torch

from conftest import make_dataset, write_idx
from csnet import data, idx
from csnet.data import COARSE_OF_FINE, DataConfig
from csnet.errors import CsnetError, UsageError


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    path = write_idx(tmp_path / "images", images, gz=gz)
    assert torch.equal(data.read_idx(path), images)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(data.read_idx(write_idx(tmp_path / "labels", labels, gz=gz)), labels)


def test_truncated_idx_names_the_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CsnetError, match=r"train-images-idx3-ubyte: truncated: header says 4x28x28 = 3136 bytes"):
        data.read_idx(path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.zeros(1000, dtype=torch.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CsnetError, match="t10k-labels-idx1-ubyte.gz: not a readable gzip file"):
        data.read_idx(path)


def test_wrong_magic_names_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CsnetError, match=r"train-labels-idx1-ubyte: not a uint8 IDX file \(magic bytes 504b0304"):
        data.read_idx(path)


def test_missing_data_names_every_folder_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("CSNET_DATA_ROOT", str(tmp_path / "env-root"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(idx, "SYSTEM_DATA_ROOT", tmp_path / "system")
    with pytest.raises(CsnetError) as err:
        data.locate(data.DATASETS["fashion"])
    message = str(err.value)
    for folder in ("env-root/fashion-mnist", "data/fashion-mnist", "system/fashion-mnist"):
        assert folder in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message


def test_search_order_prefers_the_environment_variable(tmp_path, monkeypatch):
    make_dataset(tmp_path / "env-root", gz=False)
    make_dataset(tmp_path / "data", gz=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSNET_DATA_ROOT", str(tmp_path / "env-root"))
    files = data.locate(data.DATASETS["fashion"])
    assert files["train_images"] == tmp_path / "env-root" / "fashion-mnist" / "train-images-idx3-ubyte"
    monkeypatch.delenv("CSNET_DATA_ROOT")
    files = data.locate(data.DATASETS["fashion"])
    assert files["train_images"] == Path("data") / "fashion-mnist" / "train-images-idx3-ubyte.gz"


def test_coarse_task_groups_the_fine_classes_as_in_the_reproduction():
    shoes, women, other = [5, 7, 9], [3, 6, 8], [0, 1, 2, 4]
    for coarse, fine_classes in enumerate((shoes, women, other)):
        assert all(COARSE_OF_FINE[f] == coarse for f in fine_classes)


def test_splits_are_seeded_disjoint_and_z_scored_with_training_statistics(data_root):
    cfg = DataConfig(data_root=str(data_root), val_size=100, train_size=300)
    d = data.load(cfg, ["fine", "coarse"])
    assert (len(d.train), len(d.val), len(d.test)) == (300, 100, 200)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (1, 28, 28)
    torch.testing.assert_close(d.train.labels["coarse"], COARSE_OF_FINE[d.train.labels["fine"]])
    # the same seed gives the same split; val and train never share an image position
    again = data.load(cfg, ["fine"])
    assert torch.equal(again.val.images, d.val.images) and torch.equal(again.train.images, d.train.images)
    all_train = data.read_idx(data.locate(data.DATASETS["fashion"], data_root)["train_images"])
    rows = {bytes(img.numpy()): i for i, img in enumerate(all_train)}
    val_idx = {rows[bytes(img[0].numpy())] for img in d.val.images}
    train_idx = {rows[bytes(img[0].numpy())] for img in d.train.images}
    assert not val_idx & train_idx
    assert d.mean == pytest.approx(d.train.images.float().mean().item())
    other = data.load(DataConfig(data_root=str(data_root), val_size=100, train_size=300, split_seed=1), ["fine"])
    assert not torch.equal(other.val.images, d.val.images)


def test_batches_cover_every_sample_once_and_the_network_normalises_them(data_root):
    from csnet.models.network import ModelConfig, build_network

    d = data.load(DataConfig(data_root=str(data_root), val_size=100), ["fine"])
    net = build_network(ModelConfig(tasks=("fine",), num_classes=(10,), stitch="none"))
    net.input_norm.set(d.mean, d.std)
    seen, n = [], 0
    for x, labels in data.batches(d.train, 64, generator=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32 and x.shape[0] == labels["fine"].shape[0] <= 64
        seen.append(net.input_norm(x))
        n += x.shape[0]
    assert n == len(d.train)
    everything = torch.cat(seen)
    assert abs(everything.mean().item()) < 1e-4 and everything.std().item() == pytest.approx(1.0, abs=1e-3)
    # the statistics travel in the weights: a network rebuilt from its state dict z-scores alike
    again = build_network(ModelConfig(tasks=("fine",), num_classes=(10,), stitch="none"))
    again.load_state_dict(net.state_dict())
    assert torch.equal(again.input_norm(seen[0]), net.input_norm(seen[0]))


@pytest.mark.parametrize("cfg,message", [
    (DataConfig(dataset="cifar"), "unknown dataset 'cifar'; valid: fashion"),
    (DataConfig(val_size=700), "--val-size must be between 1 and 699"),
    (DataConfig(val_size=100, train_size=601), "--train-size must be between 1 and 600"),
])
def test_bad_data_settings(data_root, cfg, message):
    from dataclasses import replace
    with pytest.raises(UsageError, match=message):
        data.load(replace(cfg, data_root=str(data_root)), ["fine"])


def test_label_count_mismatch_is_an_error(data_root):
    labels = data_root / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    os.remove(labels)
    write_idx(labels.with_suffix(""), torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(CsnetError, match="10 labels for 200 images"):
        data.load(DataConfig(data_root=str(data_root), val_size=100), ["fine"])
