"""Compare runs from their files alone: each task's test metrics at each run's best validation epoch,
across seeds.

Model selection on validation, reporting on test, keeps the comparison honest:
picking the best test epoch would flatter every run. A folder made with --seeds
is one entry: mean, standard deviation and a 95% t-interval over its seeds, and
against the first entry the paired difference over the seeds both have, with the
p-value of a paired t-test (scipy.stats). The table shows each task's primary
metric (accuracy, mean AP, R², mIoU, δ1: all higher is better) and the score, their mean.

Delta_m is the multi-task score of Maninis et al. (CVPR 2019) and Vandenhende et al.
(TPAMI 2021): Δm = (1/T) Σ_i (−1)^{l_i} (M_i − M_ref,i) / M_ref,i in percent, l_i = 1 where
lower is better. A task with several Δm metrics (depth: abs_err, abs_rel) contributes
the mean of their terms, as LibMTL averages them. Kinds and directions are read from
each run's config.json (what its tasks recorded), so compare never imports a model.

Runs are compared only where they were tested alike: the same data set and test set (data
files' SHA-256, test examples, split seed, from config.json), unless --allow-mismatch, which
REPORT.md then records. Tasks that not every run has are shown but left out of the score and of
the differences. Units: metrics a task marks as fractions (accuracy, mean AP, mIoU, δ1) and the
score are in percent and their differences in points; errors stay in the target's units.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from csnet import plots, runio
from csnet.errors import CsnetError, UsageError
from csnet.units import PERCENT, labelled, scale


def read_metrics(run: Path) -> pd.DataFrame:
    path = runio.require_run(run) / runio.METRICS
    if not path.is_file():
        raise UsageError(f"{run} has no {runio.METRICS} (a stitched run that was never trained? "
                         f"train it with: csnet train --from {run})")
    return read_table(path, "metrics file", text=("split", "task", "metric"), numbers=("epoch", "value"),
                      whole=("epoch",))


def read_table(path: Path, what: str, text: tuple[str, ...], numbers: tuple[str, ...], whole: tuple[str, ...] = (),
               finite: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV table of a run folder, checked before use (it may be hand-edited or damaged): every column
    present, at least one row, numbers where numbers belong (``whole``: whole numbers from 0,
    ``finite``: no NaN or inf). The message names the file, and the line of the first bad cell."""
    try:
        df = pd.read_csv(path, dtype=dict.fromkeys(text, str), keep_default_na=False,
                         na_values={c: ["nan", "NaN", ""] for c in numbers})
    except (OSError, ValueError) as e:  # ValueError: a malformed table, or bytes that are not UTF-8
        raise CsnetError(f"{path}: unreadable ({str(e).strip().splitlines()[0]})") from e
    missing = set(text) - set(df.columns) | set(numbers) - set(df.columns)
    if missing or df.empty:
        raise CsnetError(f"{path}: not a csnet {what} (missing {', '.join(sorted(missing)) or 'rows'})")
    for col in numbers:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna() & (df[col].astype(str).str.strip().str.lower() != "nan")
        if col in whole or col in finite:
            bad |= num.isna() | ~np.isfinite(num)
        if col in whole:
            bad |= (num < 0) | (num != num.round())
        if bad.any():
            line = int(bad.to_numpy().nonzero()[0][0]) + 2  # 1-based, after the header
            kind = ("a whole epoch number" if col == "epoch" else "a whole number") if col in whole else \
                "a finite number" if col in finite else "a number"
            raise CsnetError(f"{path}, line {line}: {col} {str(df[col][bad].iloc[0])!r} is not {kind}")
        df[col] = num.astype(int) if col in whole else num.astype(float)
    return df


# What a run without a "tasks" section in config.json (an older csnet) trained: classification.
CLASSIFICATION = {"kind": "classification", "primary": "accuracy", "metrics": {"accuracy": "higher"},
                  "delta": ["accuracy"]}
# Units of runs whose tasks did not record them yet: the fractions of csnet's kinds.
_FRACTIONS = {"accuracy", "macro_f1", "mean_ap", "miou", "pixel_accuracy", "delta1"}


def task_info(run: Path, tasks) -> dict[str, dict]:
    """{task: {kind, primary, metrics: {name: higher|lower}, delta}} as the run recorded them."""
    recorded = runio.read_config(run).get("tasks")
    recorded = recorded if isinstance(recorded, dict) else {}
    info = {}
    for t in tasks:
        r = recorded.get(t)
        ok = isinstance(r, dict) and isinstance(r.get("primary"), str) and isinstance(r.get("metrics"), dict) \
            and isinstance(r.get("delta"), list) and all(v in ("higher", "lower") for v in r["metrics"].values())
        info[t] = dict(r if ok else CLASSIFICATION)
        units = info[t].get("units")
        # runs that did not record units (an older csnet, a stitch run): csnet's kinds' fractions by name
        info[t]["units"] = units if isinstance(units, dict) else dict.fromkeys(_FRACTIONS, PERCENT)
    return info


def selected_by(run: Path) -> tuple[str, str, float]:
    """(task, metric, sign) of the validation value the run picked its best epoch by: its --select, else the
    score (``mean``/``score``; ``mean``/``accuracy`` in runs of an older csnet)."""
    train = runio.section(runio.read_config(run), "train", run, optional=True) or {}
    select = train.get("select")
    if isinstance(select, str) and select.count(":") == 1:
        task, metric = select.split(":")
        direction = task_info(run, [task])[task]["metrics"].get(metric, "higher")
        return task, metric, 1.0 if direction == "higher" else -1.0
    return "mean", "score", 1.0


def summarize(df: pd.DataFrame, by: tuple[str, str, float] = ("mean", "score", 1.0)) -> dict:
    """Best epoch by the validation value ``by`` (the first, on ties) and every test metric there."""
    task, metric, sign = by
    val = df[(df.split == "val") & (df.task == task) & (df.metric == metric)].set_index("epoch").value
    if metric == "score":  # epochs of an older csnet (a run resumed since): their score was the mean accuracy
        older = df[(df.split == "val") & (df.task == task) & (df.metric == "accuracy")].set_index("epoch").value
        val = pd.concat([val, older[~older.index.isin(val.index)]]).sort_index()
    if val.dropna().empty:
        raise CsnetError(f"metrics have no validation {task} {metric} (no labelled validation samples?)")
    best = int((sign * val).idxmax())
    test = df[(df.split == "test") & (df.epoch == best)]
    return {
        "epochs": int(df.epoch.max()),
        "best_epoch": best,
        "val_mean": float(val[best]),
        "test": {(t, "score" if (t, m) == ("mean", "accuracy") else m): float(v)
                 for t, m, v in zip(test.task, test.metric, test.value)},
    }


def members(entry: Path) -> dict[int, Path]:
    """{seed: run folder}: the trained seeds of a --seeds folder, or the run itself."""
    entry = Path(entry)
    if runio.is_group(entry):
        found = {s: p for s, p in runio.group_members(entry).items() if runio.has_rows(p / runio.METRICS)}
        if not found:
            raise UsageError(f"{entry} has no trained seed runs yet")
        return found
    config = runio.read_config(entry)
    seed = (runio.section(config, "train", entry, optional=True) or {}).get("seed", 0)
    return {seed if isinstance(seed, int) else 0: entry}


def shortfalls(entry: Path, label: str, metrics: dict[int, pd.DataFrame]) -> list[str]:
    """What an entry promised and has not done: seeds of seeds.json without a trained run, and runs
    stopped before their last epoch. compare says so rather than average fewer runs silently."""
    entry = Path(entry)
    notes = []
    runs = runio.group_members(entry) if runio.is_group(entry) else members(entry)
    absent = [s for s in runs if s not in metrics]
    if absent:
        notes.append(f"{label}: {len(metrics)} of {len(runs)} seeds trained (seed {', '.join(map(str, absent))} "
                     f"missing)")
    for seed, df in metrics.items():
        train = runio.section(runio.read_config(runs[seed]), "train", runs[seed], optional=True) or {}
        planned = train.get("epochs")
        if isinstance(planned, int) and int(df.epoch.max()) < planned:
            notes.append(f"{label}: {runs[seed]} stopped after epoch {int(df.epoch.max())} of {planned}")
    if notes:
        notes[-1] += f"; finish it with: csnet train --resume {entry}"
    return notes


def labels_for(runs: list[Path]) -> list[str]:
    """Folder names, or whole paths where two runs share a name."""
    names = [Path(r).name for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def entry_scores(entry: Path) -> tuple[pd.DataFrame, dict[int, pd.DataFrame], dict]:
    """Per seed (rows) each task's primary test metric and the score (column ``mean``) at the best
    validation epoch, the metrics of each seed, and ``info``: the network's size from config.json, the
    tasks' kinds and directions, and every test metric per seed (``info["full"]``, columns (task, metric))."""
    runs = members(entry)
    metrics = {seed: read_metrics(path) for seed, path in runs.items()}
    rows, info = {}, {"epochs": [], "best_epoch": []}
    for seed, df in metrics.items():
        try:
            s = summarize(df, selected_by(runs[seed]))
        except CsnetError as e:
            raise CsnetError(f"{runs[seed] / runio.METRICS}: {e}") from None
        rows[seed] = s["test"]
        info["epochs"].append(s["epochs"])
        info["best_epoch"].append(s["best_epoch"])
    first_run = next(iter(runs.values()))
    info["configs"] = {seed: runio.read_config(path) for seed, path in runs.items()}
    stats_ = info["configs"][next(iter(runs))].get("model_stats")
    info["model_stats"] = stats_ if isinstance(stats_, dict) else {}
    full = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    full.columns = pd.MultiIndex.from_tuples(full.columns)
    tasks = [t for t in dict.fromkeys(full.columns.get_level_values(0)) if t not in ("mean", "total", "all")]
    info["tasks"] = task_info(first_run, tasks)
    info["full"] = full
    scores = pd.DataFrame({t: full.get((t, info["tasks"][t]["primary"]), pd.Series(np.nan, index=full.index))
                           for t in tasks}, index=full.index)
    scores["mean"] = full[("mean", "score")] if ("mean", "score") in full else np.nan
    return scores, metrics, info


def interval(values: pd.Series) -> tuple[float, float, float, float]:
    """mean, sample std, and the 95% t-interval of the mean (NaN with one value)."""
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return (math.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(v.std(ddof=1))
    if std == 0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(0.95, len(v) - 1, loc=mean, scale=std / math.sqrt(len(v)))
    return mean, std, float(low), float(high)


def paired(a: pd.Series, b: pd.Series) -> tuple[float, float, int]:
    """Mean difference a - b over the seeds both have, the paired t-test's p-value, and how many seeds.
    Without common seeds: Welch's unpaired test on the two sets."""
    common = a.dropna().index.intersection(b.dropna().index)
    if len(common) >= 2:
        d = a[common] - b[common]
        # constant differences have no spread: the t statistic is undefined, not a certainty
        p = math.nan if np.allclose(d, d.iloc[0]) else float(stats.ttest_rel(a[common], b[common]).pvalue)
        return float(d.mean()), p, len(common)
    if len(common) == 1 or len(a.dropna()) < 2 or len(b.dropna()) < 2:
        # too few seeds to test; the difference of the means matches the table's own means
        return float(a.mean() - b.mean()), math.nan, len(common)
    return float(a.mean() - b.mean()), float(stats.ttest_ind(a.dropna(), b.dropna(), equal_var=False).pvalue), 0


def delta_m(scores: dict[tuple[str, str], float], references: dict[tuple[str, str], float],
            tasks: dict[str, dict]) -> float:
    """Δm in percent: the mean over tasks of (−1)^{l} (M − M_ref) / M_ref, each task's terms averaged over its
    Δm metrics (``tasks[t]["delta"]``, directions in ``tasks[t]["metrics"]``). Tasks or metrics without a
    value, or with a zero reference, are left out."""
    per_task = []
    for t, info in tasks.items():
        terms = []
        for m in info["delta"]:
            value, ref = scores.get((t, m), math.nan), references.get((t, m), math.nan)
            if math.isnan(value) or math.isnan(ref) or ref == 0:
                continue
            sign = -1.0 if info["metrics"].get(m) == "lower" else 1.0
            terms.append(sign * (value - ref) / abs(ref))
        if terms:
            per_task.append(sum(terms) / len(terms))
    return 100.0 * sum(per_task) / len(per_task) if per_task else math.nan


def check_kinds(entries: dict, labels: list[str]) -> None:
    """A task that two entries trained as different kinds (or scored by different metrics) has numbers
    that do not compare: refuse rather than put them in one column."""
    seen: dict[str, tuple[str, dict]] = {}
    for label in labels:
        for task, info in entries[label][2]["tasks"].items():
            if task in seen and (seen[task][1]["kind"].split(":")[0], seen[task][1]["primary"]) != \
                    (info["kind"].split(":")[0], info["primary"]):
                raise UsageError(f"task {task} is {seen[task][1]['kind']} in {seen[task][0]} but {info['kind']} in "
                                 f"{label}: their numbers do not compare (rename the task in one of them)")
            seen.setdefault(task, (label, info))


# Data sets whose test set is a fixed file: the split seed only picks a --test-size subset of it.
_FIXED_TEST = ("fashion", "mnist", "mnist+fashion")


def test_set(config: dict) -> dict[str, object]:
    """What a run was tested on, from its config.json: what must match for two runs' numbers to compare.
    A csv: or folder: source is named by its files' SHA-256, not its path. The split seed counts where it
    picks test examples (a --test-size subset, the scenes, a table's or folder's seeded test fifth)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    stats_ = config.get("data_stats") if isinstance(config.get("data_stats"), dict) else {}
    files = stats_.get("files") if isinstance(stats_.get("files"), dict) else {}
    dataset = str(data.get("dataset", "?"))
    seeded = not ((dataset in _FIXED_TEST and data.get("test_size") is None) or data.get("test_csv"))
    return {"data set": dataset.split(":", 1)[0] if ":" in dataset else dataset,
            "test examples": stats_.get("test", data.get("test_size")),
            "split seed": data.get("split_seed") if seeded else None,
            "data files (SHA-256)": {k: v.get("sha256") for k, v in sorted(files.items()) if isinstance(v, dict)}}


def mismatches(configs: dict[str, dict]) -> list[str]:
    """Every way in which the runs' test sets differ (``configs``: label -> config.json), each naming two
    runs that differ; what a run did not record (an older csnet) is not held against it."""
    idents = {label: test_set(c) for label, c in configs.items()}
    found = []
    for what in next(iter(idents.values())):
        known = {label: i[what] for label, i in idents.items() if i[what] not in (None, {})}
        first = next(iter(known), None)
        for label, value in known.items():
            if value != known[first]:
                shown_ = "other files" if isinstance(value, dict) else f"{known[first]} vs {value}"
                found.append(f"{first} and {label} differ in {what} ({shown_})")
                break
    return found


def _flat(config: dict) -> dict[str, object]:
    flat = {"source": config.get("source")}
    for section in ("data", "model", "train"):
        for key, value in (config.get(section) or {}).items():
            if (section, key) != ("model", "target_stats"):  # worked out from the data, not a setting
                flat[f"{section}.{key}"] = value
    return flat


def differing_settings(configs: dict[str, dict]) -> dict[str, dict[str, object]]:
    """setting -> {label: value} for the settings in which the runs differ (from their config.json)."""
    flats = {label: _flat(c) for label, c in configs.items()}
    keys = list(dict.fromkeys(k for f in flats.values() for k in f))
    # a setting one run did not record (an older csnet) differs only where the runs that have it differ
    return {k: {label: f.get(k) for label, f in flats.items()} for k in keys
            if len({repr(f[k]) for f in flats.values() if k in f}) > 1}


def command_line(config: dict) -> str:
    argv = config.get("argv")
    if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
        return shlex.join(argv)
    return "(not recorded: a run of an older csnet)"


def curve_series(metrics: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Per (split, task, metric, epoch) the mean over seeds and its 95% t-interval (NaN with one seed):
    the lines and bands of the figures, the same interval as the tables."""
    both = pd.concat(metrics.values(), ignore_index=True)
    rows = []
    for (split, task, metric, epoch), group in both.groupby(["split", "task", "metric", "epoch"], sort=False):
        mean, _, low, high = interval(group.value)
        rows.append((split, task, metric, epoch, mean, low, high))
    return pd.DataFrame(rows, columns=["split", "task", "metric", "epoch", "mean", "low", "high"])


def panels(info: dict[str, dict], score: bool = True) -> list[tuple[str, str, str]]:
    """The test_metrics figure's panels: each task's primary metric in its unit (``info``: task_info's), then
    the score."""
    return [(t, i["primary"], i["units"].get(i["primary"], "")) for t, i in info.items()] + \
        ([("mean", "score", PERCENT)] if score else [])


def weights_moved(metrics) -> bool:
    """Whether a --weighting moved any task's loss weight (the plain sum's are 1 throughout), in any of the
    ``metrics`` tables: then the loss_weights figure is drawn."""
    return any(bool(((df.metric == "loss_weight") & (df.value != 1)).any()) for df in metrics)


def _key(task: str, metric: str, unit: str) -> str:
    return labelled(f"{task}:{metric}", unit)


def compare(runs: list[Path], out: Path, references: list[Path] | None = None,
            allow_mismatch: bool = False) -> tuple[pd.DataFrame, list[Path]]:
    """One row per entry: each task's primary test metric and the score (over seeds: mean, std, 95% CI), the paired
    difference from the first entry with its p-value, Delta_m against the references, and the network's size.
    Refuses runs tested on different data unless ``allow_mismatch``. Writes compare.csv, REPORT.md and the
    plots to ``out``."""
    if len(runs) < 2:
        raise UsageError("compare needs at least two runs")
    runio.ensure_new(out)
    labels = labels_for(runs)
    entries = {label: entry_scores(run) for label, run in zip(labels, runs)}
    ref_paths = references or [runs[0]]
    by_path = {Path(run).resolve(): label for label, run in zip(labels, runs)}
    ref_entries = {str(ref): entry_scores(ref) for ref in ref_paths if Path(ref).resolve() not in by_path}
    check_kinds({**entries, **ref_entries}, [*labels, *ref_entries])
    configs = {f"{label} (seed {seed})" if len(e[2]["configs"]) > 1 else label: config
               for label, e in {**entries, **ref_entries}.items() for seed, config in e[2]["configs"].items()}
    differ = mismatches(configs)
    if differ and not allow_mismatch:
        raise UsageError(f"{differ[0]}: their numbers do not compare (pass --allow-mismatch to compare them "
                         "anyway; REPORT.md then says so)")
    ref_scores: dict[tuple[str, str], float] = {}
    for ref in ref_paths:  # the first reference that has a task sets its reference values
        label = by_path.get(Path(ref).resolve())
        full = (entries[label] if label else ref_entries[str(ref)])[2]["full"]
        for task in dict.fromkeys(full.columns.get_level_values(0)):
            if task in ("mean", "total", "all") or any(k[0] == task for k in ref_scores):
                continue
            for metric in full[task].columns:
                ref_scores[(task, metric)] = float(full[(task, metric)].mean())
    notes = [n for label, run in zip(labels, runs) for n in shortfalls(run, label, entries[label][1])]
    notes += [f"{d}; compared anyway (--allow-mismatch)" for d in differ]
    tasks = list(dict.fromkeys(t for scores, _, _ in entries.values() for t in scores.columns if t != "mean"))
    shared = [t for t in tasks if all(t in e[0].columns for e in entries.values())]
    if shared != tasks:
        notes.append(f"not every run has the task(s) {', '.join(t for t in tasks if t not in shared)}: shown, but "
                     "left out of the score, the differences and Δm" if shared else
                     "the runs share no task: there is no score or difference to compare, and each run's Δm "
                     "is over its own tasks against the references")
    kinds = {t: info["tasks"][t] for _, _, info in reversed(list(entries.values())) for t in info["tasks"]}
    primary = {t: kinds[t]["primary"] for t in tasks}
    unit = {t: kinds[t]["units"].get(primary[t], "") for t in tasks}
    base = _scores_over(entries[labels[0]][0], shared, tasks)
    rows = []
    for label, run in zip(labels, runs):
        scores, _, info = entries[label]
        scores = _scores_over(scores, shared, tasks)
        row = {"run": label, "path": str(run), "seeds": len(scores), "epochs": max(info["epochs"]),
               "best_epoch": float(np.mean(info["best_epoch"])),
               "parameters": info["model_stats"].get("parameters"), "macs": info["model_stats"].get("macs_per_example")}
        for task in tasks + ["score"]:
            u = PERCENT if task == "score" else unit[task]
            key = "score" if task == "score" else f"{task}:{primary[task]}"
            col = scores[task] * scale(u) if task in scores else pd.Series(dtype=float)
            mean, std, low, high = interval(col)
            row.update({labelled(key, u): mean, f"{labelled(key, u)} std": std,
                        f"{labelled(key, u)} ci_low": low, f"{labelled(key, u)} ci_high": high})
            if (task == "score" or task in shared) and len(col) and task in base:
                diff, p, n = paired(col, base[task] * scale(u))
                row.update({labelled(f"{key} diff", "points" if u == PERCENT else u): diff, f"{key} p": p,
                            f"{key} paired seeds": n})
        full = info["full"]
        for task in tasks:  # every metric of every task, averaged over seeds
            for metric in (full[task].columns if task in full.columns.get_level_values(0) else ()):
                u = kinds[task]["units"].get(metric, "")
                row[_key(task, metric, u)] = float(full[(task, metric)].mean()) * scale(u)
        row[labelled("delta_m", PERCENT)] = delta_m(
            {(t, m): float(full[(t, m)].mean()) for t, m in full.columns}, ref_scores,
            {t: info["tasks"][t] for t in (shared or list(info["tasks"])) if t in info["tasks"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(tasks=tasks, shared=shared, primary=primary, units=unit, notes=notes)
    runio.new_folder(out)
    table.to_csv(out / "compare.csv", index=False, float_format="%.6g")
    series = {label: curve_series({s: _rescored(df, shared, primary) for s, df in entries[label][1].items()})
              for label in labels}
    figures = plots.curves(series, out, panels({t: kinds[t] for t in tasks}, score=bool(shared)),
                           weights=weights_moved(df for e in entries.values() for df in e[1].values()))
    finals = {}
    for label, run in zip(labels, runs):
        files = [p / runio.ALPHA_FINAL for p in members(run).values() if (p / runio.ALPHA_FINAL).is_file()]
        if files:
            finals[label] = pd.concat(read_table(f, "alpha table", text=("point", "target", "source"),
                                                 numbers=("channel", "value"), whole=("channel",),
                                                 finite=("value",)) for f in files)
    if finals:
        figures.append(plots.alpha_side_by_side(finals, out / "alpha.png"))
    first = {label: next(iter(e[2]["configs"].values())) for label, e in entries.items()}
    write_report(table, figures, out, [str(r) for r in ref_paths], notes, first)
    return table, figures


def _rescored(df: pd.DataFrame, shared: list[str], primary: dict[str, str]) -> pd.DataFrame:
    """A run's metrics with its score rows over the shared tasks only, as the table's score: where the run
    has exactly those tasks its own score is that already; with none shared, no score rows."""
    own = [t for t in dict.fromkeys(df.task) if t not in ("mean", "total", "all")]
    if set(own) == set(shared):
        return df
    score = (df.task == "mean") & (df.metric.isin(["score", "accuracy"]))
    rest = df[~score]
    if not shared:
        return rest
    picked = pd.concat([df[(df.task == t) & (df.metric == primary[t])] for t in shared])
    mean = picked.groupby(["epoch", "split"], as_index=False).value.mean()
    return pd.concat([rest, mean.assign(task="mean", metric="score")], ignore_index=True)


def _scores_over(scores: pd.DataFrame, shared: list[str], tasks: list[str]) -> pd.DataFrame:
    """The entry's scores with ``score``: its recorded score where it has exactly the shared tasks, else the
    mean of the shared tasks' primary metrics (NaN where no task is shared)."""
    scores = scores.copy()
    own = [t for t in scores.columns if t != "mean"]
    if set(own) == set(shared):
        scores["score"] = scores["mean"]
    else:
        scores["score"] = scores[shared].mean(axis=1) if shared else np.nan
    return scores.drop(columns="mean")


def _cell(row: pd.Series, key: str, unit: str, first: bool) -> str:
    name = labelled(key, unit)
    mean = row.get(name)
    if mean is None or pd.isna(mean):
        return "–"
    digits = (lambda v: f"{v:.2f}") if unit == PERCENT else (lambda v: f"{v:.3g}")
    text = digits(mean)
    std, low, high = row.get(f"{name} std"), row.get(f"{name} ci_low"), row.get(f"{name} ci_high")
    if std is not None and not pd.isna(std):
        text += f" ± {digits(std)} [{digits(low)}, {digits(high)}]"
    diff = row.get(labelled(f"{key} diff", "points" if unit == PERCENT else unit))
    if not first and diff is not None and not pd.isna(diff):
        p = row.get(f"{key} p")
        text += f" ({diff:+.2f}" if unit == PERCENT else f" ({diff:+.3g}"
        text += (f", p={p:.3g}" if p is not None and not pd.isna(p) else "") + ")"
    return text


def format_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the console table and REPORT.md."""
    tasks, primary, unit = table.attrs["tasks"], table.attrs["primary"], table.attrs["units"]
    header = ["run", "seeds", "params", "MACs/example"] + \
        [labelled(f"{t} {primary[t]}", unit[t]) for t in tasks] + ["score [%]", "Δm [%]"]
    cells = []
    for i, row in table.iterrows():
        params, macs, dm = row.get("parameters"), row.get("macs"), row.get(labelled("delta_m", PERCENT))
        cells.append([row.run, str(row.seeds),
                      f"{params / 1e6:.2f}M" if params is not None and not pd.isna(params) else "–",
                      f"{macs / 1e6:.1f}M" if macs is not None and not pd.isna(macs) else "–",
                      *[_cell(row, f"{t}:{primary[t]}", unit[t], i == 0) for t in tasks],
                      _cell(row, "score", PERCENT, i == 0),
                      "–" if dm is None or pd.isna(dm) else f"{dm:+.2f}"])
    return header, cells


def _setting(value) -> str:
    text = "–" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|")


def write_report(table: pd.DataFrame, figures: list[Path], out: Path, refs: list[str], notes: list[str],
                 configs: dict[str, dict]) -> None:
    """REPORT.md: what the runs were (command lines, the settings in which they differ), then the table."""
    header, cells = format_rows(table)
    lines = ["# csnet comparison", "", "## Runs", ""]
    lines += [f"- **{label}** ({row.seeds} seed{'s' if row.seeds > 1 else ''}): `{command_line(configs[label])}`"
              for label, (_, row) in zip(configs, table.iterrows())]
    differ = differing_settings(configs)
    lines += ["", "Settings in which they differ:" if differ else "They differ in no recorded setting.", ""]
    if differ:
        lines += ["| setting | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
        lines += [f"| {k} | " + " | ".join(_setting(v[label]) for label in configs) + " |" for k, v in differ.items()]
    lines += [
        "", "## Results", "",
        "Each task's primary test metric at each run's best validation epoch, and the score (the mean of "
        "the primary metrics as fractions, in %, which picks that epoch on validation). Percent for "
        "fractions, the target's units for errors. With several seeds: mean ± std [95% t-interval]; in "
        "brackets the difference from the first run (points for percentages) and the p-value of a paired "
        "t-test over the seeds both runs have (Welch's test where they share none). "
        f"Δm: mean relative change per task against {', '.join(refs)}, its sign flipped for lower-is-better "
        "metrics. Every metric of every run is in compare.csv.", "",
        "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *["| " + " | ".join(c) + " |" for c in cells], "",
        *[f"**Note:** {n}." for n in notes], *([""] if notes else []),
    ]
    lines += [f"![{f.stem}]({f.name})" for f in figures if f.suffix == ".png"]
    runio.atomic_write(out / "REPORT.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))


def write_summary(group: Path) -> pd.DataFrame:
    """OUT/summary.csv of a --seeds folder: per task its primary test metric at the best validation epoch,
    and the score, over seeds: n, mean, std, 95% t-interval, in the metric's unit (percent for fractions)."""
    scores, _, info = entry_scores(group)
    rows = []
    for task in scores.columns:
        metric = info["tasks"][task]["primary"] if task in info["tasks"] else "score"
        unit = info["tasks"][task]["units"].get(metric, "") if task in info["tasks"] else PERCENT
        mean, std, low, high = interval(scores[task] * scale(unit))
        rows.append({"task": task, "metric": metric, "unit": unit, "seeds": int(scores[task].notna().sum()),
                     "mean": mean, "std": std, "ci_low": low, "ci_high": high})
    summary = pd.DataFrame(rows)
    runio.atomic_write(Path(group) / runio.SUMMARY, lambda f: f.write(summary.to_csv(index=False, float_format="%.6g").encode()))
    return summary
