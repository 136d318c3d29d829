"""The run folder: one per run, with a fixed layout that later stages read.

    RUN/config.json   every resolved setting, versions, device, command line
    RUN/metrics.csv   long format: epoch, split, task, metric, value (flushed each epoch)
    RUN/model.pt      network config + weights (best validation epoch; what eval, stitch, --from load)
    RUN/last.pt       network, optimizer and RNG state after the last epoch
    RUN/plots/        figures drawn from metrics.csv
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import re
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from csnet.errors import CsnetError, UsageError

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: compare never needs it
    import torch

# The command line a run records in config.json (compare's REPORT.md opens with it). The CLI sets it to
# what was typed; from Python it is the script's sys.argv.
_command_line: list[str] | None = None


def set_command_line(argv: list[str]) -> None:
    global _command_line
    _command_line = list(argv)


def command_line() -> list[str]:
    return list(_command_line if _command_line is not None else sys.argv)


RUNS_DIR = Path("runs")
CONFIG = "config.json"
METRICS = "metrics.csv"
MODEL = "model.pt"
LAST = "last.pt"
TENSORBOARD = "tensorboard"
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


ALPHA = "alpha.csv"
ALPHA_FINAL = "alpha_final.csv"
ALPHA_FIELDS = ("epoch", "point", "target", "source", "mean", "std")
SEEDS = "seeds.json"  # marks a folder of seed-N runs made by --seeds
SUMMARY = "summary.csv"
RUN_FILES = (CONFIG, METRICS, MODEL, LAST, ALPHA, ALPHA_FINAL, "eval.csv", "plots", SEEDS, SUMMARY, TENSORBOARD)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def run_path(name: str) -> Path:
    """runs/NAME for a run name; a name is one folder name, so it cannot reach outside runs/."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise UsageError(f"--name {name!r} is not a run name (letters, digits, '.', '_', '-'; no '/' or '..'); "
                         "use --out for a path")
    return RUNS_DIR / name


def ensure_new(path: Path, force: bool = False) -> Path:
    """Refuse an output folder that already has files in it, so nothing is overwritten.

    With ``force`` an earlier run may be replaced, or an unfinished one (stopped before it wrote
    config.json) started again; a folder that holds anything else never is.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if is_partial(path):
            if not force:
                raise UsageError(f"--out {path} holds a run that was stopped before it started (no {CONFIG}); "
                                 "pass --force to start it again, or choose a new folder")
            return path
        if not is_run(path):
            raise UsageError(f"--out {path} already holds files; choose a new folder")
        if not force:
            raise UsageError(f"--out {path} already holds a run; choose a new folder, pass --force to replace it, "
                             f"or continue it with: csnet train --resume {path}")
    return path


def _own(entry: Path) -> bool:
    """One of the files csnet writes into a run folder, or a temporary file of ``atomic_write``."""
    name = entry.name
    if name in RUN_FILES:
        return True
    if name.startswith(".") and name.endswith(".tmp"):
        return any(name.startswith(f".{own}.") for own in RUN_FILES)
    return False


def is_partial(path: Path) -> bool:
    """A folder a run created and was stopped in before it wrote config.json (which it writes first):
    nothing but csnet's half-written temporary files and an empty plots/, so --force may start it
    again. Anything else there (results, a user's files) makes it a folder csnet never touches."""
    path = Path(path)
    if not path.is_dir() or (path / CONFIG).exists() or (path / SEEDS).exists():
        return False
    entries = list(path.iterdir())

    def leftover(e: Path) -> bool:
        if e.name == "plots" and e.is_dir() and not e.is_symlink():
            return not any(e.iterdir())
        return e.is_file() and not e.is_symlink() and e.name.startswith(".") and _own(e)
    return bool(entries) and all(leftover(e) for e in entries)


def stale_temporaries(path: Path) -> list[Path]:
    """``.NAME.*.tmp`` files that a write killed half-way left behind."""
    return [e for e in Path(path).glob(".*.tmp") if _own(e)]


def remove_stale_temporaries(path: Path) -> None:
    for tmp in stale_temporaries(path):
        tmp.unlink(missing_ok=True)


def clear_run(path: Path) -> None:
    """Remove an earlier run's own files (only those) before --force writes a new run there."""
    targets = [path / name for name in RUN_FILES] + stale_temporaries(path) + sorted(path.glob("seed-*"))
    try:
        for target in targets:
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    except OSError as e:
        raise CsnetError(f"cannot remove the earlier run in {path} for --force: {e.strerror or e}") from e


def new_folder(path: Path, force: bool = False) -> Path:
    """Make an empty output folder (see ``ensure_new``)."""
    path = ensure_new(path, force)
    if force and (is_run(path) or is_partial(path)):
        clear_run(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CsnetError(f"cannot create {path}: {e.strerror or e}") from e
    return path


def create_run(path: Path, config: dict, force: bool = False) -> Path:
    """Make the run folder and write its identity, config.json, before anything else: a run stopped at
    any later moment is then a run that --resume or --force recognises."""
    new_folder(path, force)
    write_json(path / CONFIG, config)
    (path / "plots").mkdir(exist_ok=True)
    return path


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file() or is_group(path)


def is_group(path: Path) -> bool:
    """A folder of runs made with --seeds: RUN/seed-0, RUN/seed-1, ... and RUN/seeds.json."""
    return (Path(path) / SEEDS).is_file()


def read_group(path: Path) -> dict:
    """A --seeds folder's seeds.json: ``seeds`` (a list of whole numbers) and, from csnet versions that
    record it, ``plan``: what every seed runs, so --resume can run the seeds not yet started."""
    file = Path(path) / SEEDS
    group = read_json(file)
    seeds = group.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in seeds)):
        raise CsnetError(f"{file}: 'seeds' should be a list of whole numbers, found {seeds!r}")
    if not isinstance(group.get("plan", {}), dict):
        raise CsnetError(f"{file}: 'plan' should be an object")
    return group


def group_members(path: Path) -> dict[int, Path]:
    """{seed: RUN/seed-N} of a --seeds folder."""
    return {s: Path(path) / f"seed-{s}" for s in read_group(path)["seeds"]}


def has_rows(path: Path) -> bool:
    """A metrics.csv with at least one epoch (a run stopped in its first epoch has only the header)."""
    try:
        with open(path, "rb") as f:
            return len([line for line in f.read(1 << 16).splitlines()[:2] if line.strip()]) > 1
    except OSError:
        return False


def require_run(path: Path) -> Path:
    path = Path(path)
    if not (path / CONFIG).is_file():
        hint = f"; it holds seed runs: use {path}/seed-N" if is_group(path) else ""
        raise UsageError(f"{path} is not a csnet run folder (no {CONFIG}){hint}")
    return path


def write_failed(path: Path, e: BaseException) -> CsnetError:
    """One line for a write that storage refused; torch.save reports a short write as a RuntimeError."""
    reason = (e.strerror or str(e)) if isinstance(e, OSError) else "the write failed (is the disk full?)"
    kept = "the previous one is intact" if path.exists() else "no earlier one exists"
    return CsnetError(f"cannot write {path}: {reason}; {kept}")


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it, so a crash leaves the old file whole.
    A storage fault (a full disk, a read-only folder) is one CsnetError naming the file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a run from collaborators
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, e) from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def read_json(path: Path) -> dict:
    """A JSON object from a run folder; anything else (unreadable, not UTF-8, not an object) is one error."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise CsnetError(f"{path}: unreadable ({e.strerror or e})") from e
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise CsnetError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CsnetError(f"{path}: not a JSON object (found {type(value).__name__})")
    return value


def read_config(run: Path) -> dict:
    return read_json(require_run(run) / CONFIG)


def section(config: dict, name: str, run: Path, optional: bool = False) -> dict | None:
    """``config[name]`` of a run's config.json, checked to be an object."""
    value = config.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        what = "missing" if value is None else f"not an object (found {type(value).__name__})"
        raise CsnetError(f"{Path(run) / CONFIG}: section {name!r} is {what}")
    return value


def code_version() -> dict:
    """The git commit of the csnet code that runs, when it runs from a checkout (and whether it was edited)."""
    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"git_commit": None}
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def environment(device: torch.device) -> dict:
    """Versions, code commit and hardware recorded in config.json before the first step."""
    import torch
    import torchvision

    from csnet import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "csnet": __version__,
        **code_version(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": name,
        "argv": sys.argv,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


class CsvAppender:
    """Append rows to a CSV and flush each batch, so a crash loses at most the current epoch.

    ``keep_before_epoch`` first drops rows of later epochs (first column): a resumed run
    rewrites what came after its checkpoint.
    """

    def __init__(self, path: Path, fields: tuple[str, ...], keep_before_epoch: int | None = None):
        if keep_before_epoch is not None and path.exists():
            truncate_metrics(path, keep_before_epoch, fields)
        self._path = path
        new = not path.exists()
        try:
            self._file = open(path, "a", newline="")
        except OSError as e:
            raise write_failed(path, e) from e
        self._csv = csv.writer(self._file)
        if new:
            self.rows([fields])

    def rows(self, rows) -> None:
        try:
            self._csv.writerows(rows)
            self._file.flush()
        except OSError as e:
            raise CsnetError(f"cannot write {self._path}: {e.strerror or e}; the rows before it are kept") from e

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # the failed write was reported where it happened
            pass


class MetricsWriter(CsvAppender):
    """metrics.csv: epoch, split, task, metric, value; with ``tensorboard`` (a folder) the same values as
    TensorBoard scalars by epoch, tagged TASK/METRIC/SPLIT so a metric's splits share a chart, the units'
    weights as histograms by epoch, and every step's training loss in TENSORBOARD/steps (by step: a
    second log, so that a resume can drop each log's own later points)."""

    def __init__(self, path: Path, keep_before_epoch: int | None = None, tensorboard: Path | None = None,
                 first_step: int | None = None):
        super().__init__(path, METRIC_FIELDS, keep_before_epoch)
        self._board = self._steps = None
        if tensorboard is not None:
            if problem := tensorboard_problem():  # e.g. a --resume where the package has gone since
                raise UsageError(problem)
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run's later epochs (steps) are written again, as in metrics.csv
            self._board = SummaryWriter(str(tensorboard), purge_step=keep_before_epoch)
            self._steps = SummaryWriter(str(tensorboard / "steps"),
                                        purge_step=first_step + 1 if keep_before_epoch is not None and first_step
                                        is not None else None)

    def write(self, epoch: int, split: str, values: dict[str, dict[str, float]]) -> None:
        """``values`` is {task: {metric: value}}."""
        self.rows((epoch, split, task, metric, f"{value:.6g}")
                  for task, metrics in values.items() for metric, value in metrics.items())
        if self._board is not None:
            for task, metrics in values.items():
                for metric, value in metrics.items():
                    self._board.add_scalar(f"{task}/{metric}/{split}", value, epoch)
            self._board.flush()

    def step_loss(self, step: int, value: float) -> None:
        self._steps.add_scalar("train/loss", value, step)

    def histograms(self, epoch: int, values: dict) -> None:
        for tag, tensor in values.items():
            self._board.add_histogram(tag, tensor, epoch)
        self._board.flush()

    def close(self) -> None:
        super().close()
        for board in (self._board, self._steps):
            if board is not None:
                board.close()


def tensorboard_problem() -> str | None:
    """Why --tensorboard cannot run here (the optional package is missing), or None."""
    import importlib

    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        return ("--tensorboard needs the tensorboard package, an optional extra: pip install 'csnet[tensorboard]' "
                "(or pip install tensorboard)")
    return None


def truncate_metrics(path: Path, before_epoch: int, fields: tuple[str, ...] = METRIC_FIELDS) -> None:
    """Keep only rows of epochs before ``before_epoch``: a resumed run rewrites what came after its checkpoint.
    A table that is not csnet's (edited, damaged) is refused before any training, never appended to."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, ValueError, csv.Error) as e:  # ValueError: bytes that are not UTF-8
        raise CsnetError(f"{path}: unreadable ({e}); repair it or move it away to continue the run") from e
    if not rows:  # a crash before the header was flushed: start the file again
        path.unlink()
        return
    if tuple(rows[0]) != tuple(fields):
        raise CsnetError(f"{path}: its header is {','.join(rows[0])!r}, not {','.join(fields)!r}; repair it or move "
                         "it away to continue the run")
    kept = [rows[0]] + [r for r in rows[1:] if r[0].isdigit() and int(r[0]) < before_epoch]
    buf = io.StringIO()
    csv.writer(buf).writerows(kept)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def save_checkpoint(path: Path, payload: dict) -> None:
    """A full disk or a removed folder is one error; the previous file is still whole (atomic_write)."""
    import torch  # here, not at the top: compare and --help read run folders without torch

    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **payload}, f))


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise CsnetError(f"{path}: checkpoint not found")
    import torch

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
