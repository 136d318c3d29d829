"""Shared fixtures: small but real IDX files, written the way the real data set is stored."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from csnet.cli import main


def write_idx(path: Path, array: torch.Tensor, *, gz: bool = False) -> Path:
    """Write a uint8 tensor as an IDX file (big-endian header: 0, 0, 0x08, ndim, dims...)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    raw = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def synthetic_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """28x28 images whose class shows as a bright band at rows 2k..2k+4, plus noise: learnable in one epoch."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (len(labels), 28, 28), generator=g)
    for k in range(10):
        images[labels == k, 2 * k + 2: 2 * k + 6, 4:24] += 180
    return images.clamp(0, 255).to(torch.uint8)


def make_dataset(root: Path, folder: str = "fashion-mnist", n_train: int = 700, n_test: int = 200,
                 gz: bool = True, seed: int = 0) -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g).to(torch.uint8)
        write_idx(d / f"{part}-images-idx3-ubyte", synthetic_images(labels, seed + n), gz=gz)
        write_idx(d / f"{part}-labels-idx1-ubyte", labels, gz=gz)
    return root


@pytest.fixture
def data_root(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
