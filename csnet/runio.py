"""The run folder: one per run, with a fixed layout that later stages read.

    RUN/config.json   every resolved setting, versions, device, command line
    RUN/metrics.csv   long format: epoch, split, task, metric, value (flushed each epoch)
    RUN/model.pt      network config + weights (best validation epoch; what eval, stitch, --from load)
    RUN/last.pt       network, optimizer and RNG state after the last epoch
    RUN/plots/        figures drawn from metrics.csv
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

from csnet.errors import CsnetError, UsageError

RUNS_DIR = Path("runs")
CONFIG = "config.json"
METRICS = "metrics.csv"
MODEL = "model.pt"
LAST = "last.pt"
METRIC_FIELDS = ("epoch", "split", "task", "metric", "value")
CHECKPOINT_FORMAT = "csnet-checkpoint-v1"


def default_out(command: str) -> Path:
    """A new folder under runs/ named from the command and the time; never an existing one."""
    stem = f"{command}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = RUNS_DIR / stem, 1
    while path.exists():
        n += 1
        path = RUNS_DIR / f"{stem}-{n}"
    return path


def ensure_new(path: Path) -> Path:
    """Refuse an output folder that already has files in it, so nothing is overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        what = "a run" if (path / CONFIG).exists() else "files"
        raise UsageError(f"--out {path} already holds {what}; choose a new folder")
    return path


def new_folder(path: Path) -> Path:
    """Make an empty output folder (see ``ensure_new``)."""
    path = ensure_new(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CsnetError(f"cannot create {path}: {e.strerror or e}") from e
    return path


def create_run(path: Path) -> Path:
    new_folder(path)
    (path / "plots").mkdir(exist_ok=True)
    return path


def require_run(path: Path) -> Path:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise UsageError(f"{path} is not a csnet run folder (no {CONFIG})")
    return path


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it, so a crash leaves the old file whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def read_config(run: Path) -> dict:
    path = require_run(run) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CsnetError(f"{path}: unreadable ({e})") from e


def environment(device: torch.device) -> dict:
    """Versions and hardware recorded in config.json before the first step."""
    import torchvision

    from csnet import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "csnet": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": name,
        "argv": sys.argv,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


class MetricsWriter:
    """Append rows to metrics.csv and flush each batch of rows, so a crash loses at most the current epoch."""

    def __init__(self, path: Path):
        new = not path.exists()
        self._file = open(path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(METRIC_FIELDS)
            self._file.flush()

    def write(self, epoch: int, split: str, values: dict[str, dict[str, float]]) -> None:
        """``values`` is {task: {metric: value}}."""
        for task, metrics in values.items():
            for metric, value in metrics.items():
                self._csv.writerow((epoch, split, task, metric, f"{value:.6g}"))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **payload}, f))


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise CsnetError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CsnetError(
            f"{path}: refused: it holds pickled Python objects beyond tensors and plain containers, "
            "which csnet never executes"
        ) from e
    except Exception as e:  # torch.load raises many types on garbage (EOFError, IndexError, RuntimeError...)
        raise CsnetError(f"{path}: not a readable checkpoint (truncated or foreign file)") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CsnetError(f"{path}: not a csnet checkpoint")
    return ckpt
