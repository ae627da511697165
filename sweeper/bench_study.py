"""`sweeper bench --study`: what running a grid through `sweeper study run` costs over bare training.

The same N trial configs (a grid of N learning rates, each about `trial_seconds` of training) run as

(a) a bare script: one Python process that imports the trainer and calls `trainers.train.train(cfg)` for each
    config, with no callback and no checkpoint (`python -m sweeper.bench_study --bare`);
(b) the real command, end to end, as a user runs it: `python -m sweeper.cli study run SPEC` in its own
    process, with an Optuna SQLite storage and an MLflow SQLite store in a temporary directory,
    checkpoints every epoch, the courier, heartbeats, the final delivery to MLflow;
(c) the same command without the trials' MLflow models (`keep_models: 0`) and system metrics
    (`SWEEPER_SYSTEM_METRICS_INTERVAL=0`): (b) - (c) is what those records cost, and whether any of it
    lands in the training epochs (it should not: the courier process builds and uploads them).

Both are timed from process launch to process exit, so Python's start and the torch import are in both;
the arms are interleaved a-b-c, b-c-a, c-a-b, ... (drift of the machine's load hits them alike) and the
medians kept. The headline is

    overhead = (median wall of b - median wall of a) / median wall of b

i.e. what `sweeper study run` costs over the plainest script that trains the same configs. A
narrower baseline, the sum of the bare `train()` calls alone (which charges Python's start and the torch
import to the orchestration too), is reported beside it.

The breakdown needs no instrumentation in the measured process: it is read from what the study records
anyway. Optuna's trial start/complete times and the trial's summary (the sums of `epoch_time` and
`eval_time`) split the wall into setup (launch to the first trial), per-trial time outside training
epochs, gaps between trials, training epochs themselves and teardown (last trial to exit). The per-epoch
cost (checkpoint, Optuna report, MLflow enqueue) is the gap between the MLflow timestamps of consecutive
epochs minus that epoch's `epoch_time + eval_time`. The bare script records the same times for (a), and
each row's extra is (b) - (a); the rows add up to the difference of the walls.

By default both SQLite stores are created once, before anything is timed, and every repeat is a new
study in them (the usual case: `mlruns/` exists after the first study); `fresh_stores` gives every repeat
new, empty stores (a user's very first study: MLflow creates its schema then).

This module is imported by `sweeper bench --study` and runs as the bare script; its top level imports
nothing heavy (the bare script's own start is measured).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any, Callable


@dataclass
class StudyBenchSettings:
    trials: int = 8  # grid points (one learning rate each); every trial trains the same amount
    epochs: int = 5
    trial_seconds: float = 10.0  # training time per trial that calibration aims at
    train_size: int | None = None  # training images; None: calibrated to `trial_seconds`
    repeats: int = 3  # interleaved (a, b) pairs; medians are reported
    model: str = "lenet5"
    dataset: str = "synthetic"  # synthetic (3x32x32, 10 classes) or fashion-mnist
    batch_size: int = 64
    device: str = "cpu"
    threads: int = 1  # OMP/MKL threads of both arms (torch intra-op)
    fresh_stores: bool = False  # new Optuna and MLflow stores for every repeat
    quiet: bool = False  # pass --quiet to `sweeper study run` (default: as a user runs it)
    report: bool = False  # let the study build its report when it completes (not orchestration: off)
    workdir: str | None = None  # keep everything here instead of a temporary directory


# --------------------------------------------------------------------------------------------------
# The configs


def base_config(s: StudyBenchSettings, train_size: int) -> dict[str, Any]:
    if s.dataset == "synthetic":
        data = {"dataset": "synthetic", "split": "test", "augment": False,
                "synthetic": {"train_size": train_size, "test_size": max(256, train_size // 4), "channels": 3,
                              "image_size": 32, "classes": 10}}
    else:  # a real data set: a subset of its training images, 20% of them held out
        data = {"dataset": s.dataset, "split": "val", "val_fraction": 0.2, "subset": int(train_size / 0.8),
                "augment": False}
    return {"data": data, "model": {"name": s.model},
            "optim": {"name": "sgdm", "lr": 0.01, "momentum": 0.9, "weight_decay": 4.0e-4},
            "schedule": {"name": "cosine"}, "epochs": s.epochs, "batch_size": s.batch_size, "eval_batch_size": 1000,
            "device": s.device}


def learning_rates(n: int) -> list[float]:
    return [round(0.01 * 1.25 ** i, 6) for i in range(n)]


def study_spec(s: StudyBenchSettings, name: str, train_size: int, records: bool = True) -> dict[str, Any]:
    """The grid of arm (b); without `records` (arm c) it logs no model (`keep_models: 0`)."""
    return {"name": name, "kind": "grid", "description": "sweeper bench --study",
            "objective": {"metric": "eval_acc", "direction": "maximize"},
            "base": base_config(s, train_size), "grid": {"optim.lr": learning_rates(s.trials)}, "seeds": [0],
            **({} if records else {"keep_models": 0})}


def calibrate(s: StudyBenchSettings, log: Callable[[str], None]) -> int:
    """Training images per trial so that one trial trains for about `trial_seconds` (in this process,
    with the arms' thread count; the second of two epochs is timed)."""
    import torch

    from trainers.config import TrainConfig
    from trainers.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        probe = max(8 * s.batch_size, 1024)
        raw = base_config(s, probe)
        raw["epochs"] = 2
        report = train(TrainConfig.from_dict(raw), log=lambda _m: None).history[-1]
    finally:
        torch.set_num_threads(threads)
    per_epoch = s.trial_seconds / s.epochs
    eval_share = report.eval_time / report.epoch_time  # evaluation scales with the training size too
    images = per_epoch / (1 + eval_share) * report.images_per_sec
    size = max(2 * s.batch_size, int(images // s.batch_size) * s.batch_size)
    log(f"calibration: {report.images_per_sec:.0f} training images/s, evaluation {100 * eval_share:.0f}% of "
        f"that; {size} training images per epoch for ~{s.trial_seconds:g} s per trial")
    return size


# --------------------------------------------------------------------------------------------------
# The two arms, each a process of its own


def arm_env(threads: int, state_dir: Path) -> dict[str, str]:
    """A measured process's environment: `threads` intra-op threads, its own state directory, this
    checkout importable, and no tracking URI or storage of the caller's."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "SWEEPER_STATE_DIR": str(state_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for key in ("MLFLOW_TRACKING_URI", "SWEEPER_STORAGE"):
        env.pop(key, None)
    return env


def _env(s: StudyBenchSettings, state_dir: Path) -> dict[str, str]:
    env = arm_env(s.threads, state_dir)
    if s.dataset != "synthetic":  # the invoking directory's data cache, not the temporary one's
        env["SWEEPER_DATA_DIR"] = os.environ.get("SWEEPER_DATA_DIR") or str(Path("data").resolve())
    return env


def _launch(args: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> tuple[float, float, float]:
    """Run a process to its end; (launch, exit) wall-clock times and the CPU seconds of the process and its
    children (the study's courier). A failure raises with its log's tail."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    with open(log_path, "wb") as out:
        cpu0 = cpu()
        launched = time.time()
        proc = subprocess.run(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        exited = time.time()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(args[1:4])} ... exited with {proc.returncode}:\n{tail}")
    return launched, exited, cpu() - cpu0


def run_bare(s: StudyBenchSettings, configs: list[dict], work: Path, tag: str) -> dict:
    """Arm (a): the bare script in its own process."""
    cfg_path, out_path = work / f"bare-{tag}-configs.json", work / f"bare-{tag}.json"
    cfg_path.write_text(json.dumps(configs))
    launched, exited, cpu = _launch([sys.executable, "-m", "sweeper.bench_study", "--bare", str(cfg_path),
                                     str(out_path)], work, _env(s, work / "bare-state"), work / f"bare-{tag}.log")
    out = json.loads(out_path.read_text())
    trials = [{"start": t["start"], "end": t["end"], "epochs": len(t["epochs"]),
               "train": sum(a + b for a, b in t["epochs"]), "per_epoch": None} for t in out["trials"]]
    return {**timeline(launched, exited, trials, train_calls=sum(t["end"] - t["start"] for t in out["trials"])),
            "cpu": cpu}


def run_study(s: StudyBenchSettings, train_size: int, work: Path, tag: str, stores: Path,
              records: bool = True) -> dict:
    """Arm (b): `sweeper study run` in its own process; the timeline is read back from the stores. Arm (c),
    `records=False`: the same without the trials' models and system metrics (what they cost is b - c)."""
    name = f"bench-study-{tag}-{uuid.uuid4().hex[:6]}"
    spec_path = work / f"{name}.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump(study_spec(s, name, train_size, records), sort_keys=False))
    storage, uri = store_urls(stores)
    args = [sys.executable, "-m", "sweeper.cli", "study", "run", str(spec_path), "--storage", storage,
            "--tracking-uri", uri] + (["--quiet"] if s.quiet else []) + ([] if s.report else ["--no-report"])
    env = {**_env(s, stores / "mlruns"), **({} if records else {"SWEEPER_SYSTEM_METRICS_INTERVAL": "0"})}
    launched, exited, cpu = _launch(args, work, env, work / f"{name}.log")
    return {**timeline(launched, exited, study_trials(name, storage, uri, s.epochs)), "cpu": cpu}


def store_urls(stores: Path) -> tuple[str, str]:
    return f"sqlite:///{stores / 'optuna.db'}", f"sqlite:///{stores / 'mlflow.db'}"


def create_stores(stores: Path) -> None:
    """Both SQLite stores with their schema (what the first study on a machine creates)."""
    from mlflow.tracking import MlflowClient

    from .study import open_storage

    stores.mkdir(parents=True, exist_ok=True)
    storage, uri = store_urls(stores)
    open_storage(storage)
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def study_trials(name: str, storage: str, uri: str, epochs: int) -> list[dict]:
    """Each trial's start and end (Optuna), training seconds (its summary) and per-epoch cost outside
    training (MLflow's timestamps of consecutive epochs); checks that the study did all its work."""
    import optuna
    from mlflow.tracking import MlflowClient

    from .study import T_RESULT

    study = optuna.load_study(study_name=name, storage=storage)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    runs = {r.data.tags["optuna.origin_trial"]: r.info.run_id for r in client.search_runs([exp.experiment_id])
            if "optuna.origin_trial" in r.data.tags}
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state != optuna.trial.TrialState.COMPLETE:
            raise RuntimeError(f"study {name}: trial {t.number} is {t.state.name}, not COMPLETE")
        summary = t.user_attrs[T_RESULT]["summary"]
        run_id = runs.get(str(t.number))
        if run_id is None:
            raise RuntimeError(f"study {name}: trial {t.number} has no MLflow run")
        hist = {key: {m.step: m for m in client.get_metric_history(run_id, key)} for key in ("epoch_time", "eval_time")}
        if sorted(hist["epoch_time"]) != list(range(1, epochs + 1)):
            raise RuntimeError(f"study {name}: the MLflow run of trial {t.number} has epochs "
                               f"{sorted(hist['epoch_time'])}, not 1..{epochs}")
        gaps = [(hist["epoch_time"][e].timestamp - hist["epoch_time"][e - 1].timestamp) / 1000
                - hist["epoch_time"][e].value - hist["eval_time"][e].value for e in range(2, epochs + 1)]
        out.append({"start": t.datetime_start.timestamp(), "end": t.datetime_complete.timestamp(),
                    "epochs": summary["epochs"], "train": summary["epoch_time"] + summary["eval_time"],
                    "per_epoch": median(gaps) if gaps else None})
    return out


def timeline(launched: float, exited: float, trials: list[dict], train_calls: float | None = None) -> dict:
    """A run's wall split into setup, trials (training epochs, per-epoch and per-trial costs), gaps between
    trials and teardown."""
    trials = sorted(trials, key=lambda t: t["start"])
    epochs = sum(t["epochs"] for t in trials)
    per_epoch = median([t["per_epoch"] for t in trials if t["per_epoch"] is not None]) if any(
        t["per_epoch"] is not None for t in trials) else 0.0
    inside = sum(t["end"] - t["start"] for t in trials)
    train = sum(t["train"] for t in trials)
    first = trials[0]["end"] - trials[0]["start"] - trials[0]["train"] - per_epoch * trials[0]["epochs"]
    return {"wall": exited - launched, "setup": trials[0]["start"] - launched, "teardown": exited - trials[-1]["end"],
            "between": sum(b["start"] - a["end"] for a, b in zip(trials, trials[1:])),
            "train": train, "epoch_costs": per_epoch * epochs, "per_epoch": per_epoch,
            "trial_costs": inside - train - per_epoch * epochs, "first_trial_costs": first,
            "trials": len(trials), "epochs": epochs,
            "train_calls": train_calls if train_calls is not None else inside}


# --------------------------------------------------------------------------------------------------


ARMS = {"bare": "(a) bare train() script", "study": "(b) sweeper study run",
        "plain": "(c) sweeper study run, no models or system metrics"}
ROWS = (("setup", "setup: launch to the first trial"), ("trial_costs", "per-trial work outside epochs"),
        ("epoch_costs", "per-epoch work (checkpoint, report, log)"), ("between", "between trials"),
        ("train", "training epochs + evaluations"), ("teardown", "teardown: last trial to exit"))


def run_study_bench(s: StudyBenchSettings, log: Callable[[str], None] = print) -> dict:
    if s.trials < 1 or s.epochs < 1 or s.repeats < 1:
        raise ValueError("trials, epochs and repeats must be at least 1")
    work = Path(s.workdir) if s.workdir else Path(tempfile.mkdtemp(prefix="sweeper-bench-study-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        train_size = s.train_size or calibrate(s, log)
        from trainers.config import TrainConfig

        configs = [TrainConfig.from_dict(base_config(s, train_size), {"optim.lr": lr}).to_dict()
                   for lr in learning_rates(s.trials)]
        if not s.fresh_stores:
            create_stores(work / "stores")
        samples: dict[str, list[dict]] = {"bare": [], "study": [], "plain": []}
        arms = ("bare", "study", "plain")
        for rep in range(s.repeats):
            order = arms[rep % 3:] + arms[:rep % 3]  # a-b-c, b-c-a, c-a-b, ...: drift hits every arm alike
            stores = work / (f"stores-{rep}" if s.fresh_stores else "stores")
            for arm in order:
                if arm == "bare":
                    sample = run_bare(s, configs, work, str(rep))
                else:
                    sample = run_study(s, train_size, work, str(rep), stores, records=arm == "study")
                samples[arm].append(sample)
                log(f"[{rep + 1}/{s.repeats}] {ARMS[arm]:<44} {sample['wall']:7.2f} s wall, {sample['train']:6.2f} s "
                    "in training epochs")
    finally:
        if not s.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return summarize(s, train_size, samples, log)


def summarize(s: StudyBenchSettings, train_size: int, samples: dict[str, list[dict]],
              log: Callable[[str], None]) -> dict:
    keys = ["wall", "cpu", "train_calls", "per_epoch", "first_trial_costs"] + [k for k, _ in ROWS]
    med = {arm: {k: median([x[k] for x in xs]) for k in keys} for arm, xs in samples.items()}
    a, b = med["bare"], med["study"]
    extra = {k: b[k] - a[k] for k in keys}
    overhead = extra["wall"] / b["wall"]
    vs_calls = (b["wall"] - a["train_calls"]) / b["wall"]
    pairs = [(y["wall"] - x["wall"]) / y["wall"] for x, y in zip(samples["bare"], samples["study"])]
    # The same without the rows' training row: the time outside training epochs only (far less noisy on a
    # shared machine, where the training itself drifts by more than the overhead between two runs).
    outside = [((y["wall"] - y["train"]) - (x["wall"] - x["train"])) / y["wall"]
               for x, y in zip(samples["bare"], samples["study"])]
    trials, epochs = s.trials, s.trials * s.epochs
    later = (extra["trial_costs"] - extra["first_trial_costs"] + extra["between"]) / max(trials - 1, 1)
    breakdown = {"setup_s": extra["setup"], "per_trial_s": (extra["trial_costs"] + extra["between"]) / trials,
                 "first_trial_s": extra["first_trial_costs"], "per_later_trial_s": later,
                 "per_epoch_s": b["per_epoch"], "teardown_s": extra["teardown"],
                 "training_slowdown_s": extra["train"]}
    what = (f"{trials} trials x {s.epochs} epochs of {s.model} on {s.dataset} ({train_size} training images, batch "
            f"{s.batch_size}), {s.threads} thread(s), {s.device}")
    log(f"\n{what}; medians of {s.repeats} interleaved repeats")
    log(f"{'':<44}{'(a) bare':>10}{'(b) study':>11}{'extra':>9}")
    log(f"{'wall time, process launch to exit':<44}{a['wall']:>9.2f}s{b['wall']:>10.2f}s{extra['wall']:>+8.2f}s")
    for key, label in ROWS:
        log(f"  {label:<42}{a[key]:>9.2f}s{b[key]:>10.2f}s{extra[key]:>+8.2f}s")
    log(f"{'CPU time of the process and its children':<44}{a['cpu']:>9.2f}s{b['cpu']:>10.2f}s{extra['cpu']:>+8.2f}s")
    log(f"mean trial {b['wall'] / trials:.1f} s; per study: setup {extra['setup']:+.2f} s, teardown "
        f"{extra['teardown']:+.2f} s; per trial {breakdown['per_trial_s'] * 1e3:+.0f} ms (the first "
        f"{extra['first_trial_costs']:+.2f} s, the others {later * 1e3:+.0f} ms each); per epoch "
        f"{b['per_epoch'] * 1e3:.0f} ms x {epochs} epochs; training itself {extra['train']:+.2f} s")
    log(f"overhead of `sweeper study run` over the bare script: {100 * overhead:.2f}% of its wall time "
        f"(pairwise median {100 * median(pairs):.2f}%)")
    log(f"time outside training epochs only (training's own drift left out): {100 * median(outside):.2f}% "
        f"(pairwise median)")
    log(f"against the sum of the bare train() calls alone ({a['train_calls']:.2f} s; Python start and the torch "
        f"import counted as overhead too): {100 * vs_calls:.2f}%")
    c = med["plain"]
    records = {"wall_s": b["wall"] - c["wall"], "per_epoch_s": b["per_epoch"] - c["per_epoch"],
               "train_s": b["train"] - c["train"], "teardown_s": b["teardown"] - c["teardown"],
               "cpu_s": b["cpu"] - c["cpu"]}
    log(f"the trials' models and system metrics, (b) - (c): {records['wall_s']:+.2f} s wall ({100 * records['wall_s'] / b['wall']:+.2f}%), "
        f"{records['per_epoch_s'] * 1e3:+.0f} ms per epoch, training epochs {records['train_s']:+.2f} s, teardown "
        f"{records['teardown_s']:+.2f} s, CPU {records['cpu_s']:+.2f} s (the courier's work)")
    return {"settings": {**asdict(s), "train_size": train_size}, "medians": med, "extra": extra,
            "overhead": overhead, "overhead_pairwise_median": median(pairs),
            "overhead_outside_training": median(outside), "overhead_vs_train_calls": vs_calls,
            "breakdown": breakdown, "records": records, "samples": samples}


# --------------------------------------------------------------------------------------------------
# Arm (a) itself: `python -m sweeper.bench_study --bare CONFIGS.json OUT.json`


def bare_main(configs_path: str, out_path: str) -> None:
    started = time.time()
    from trainers.config import TrainConfig
    from trainers.train import train

    trials = []
    for raw in json.loads(Path(configs_path).read_text()):
        cfg = TrainConfig.from_dict(raw)
        t0 = time.time()
        result = train(cfg, log=lambda _m: None)
        trials.append({"start": t0, "end": time.time(), "status": result.status,
                       "epochs": [[r.epoch_time, r.eval_time] for r in result.history]})
    Path(out_path).write_text(json.dumps({"started": started, "trials": trials}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        bare_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m sweeper.bench_study --bare CONFIGS.json OUT.json (see `sweeper bench --study`)")
