#!/usr/bin/env python3
"""One-shot check of the trainers package's CUDA path (vmap vs serial, dist/NCCL on one GPU, bench).

Usage (from the repo root, PYTHONPATH=.):
    python tools/cuda_check.py --device cuda --out $OUT          # every section, each in its own process
    python tools/cuda_check.py --device cpu --quick --out out  # debug run on a CPU machine
    python tools/cuda_check.py --section equiv --device cuda      # one section in this process

Each section runs in a subprocess with its own timeout, so a hang or a crash in one does not lose the
others. Results go to stdout (tee it) and as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

T0 = time.perf_counter()


def log(msg: str = "") -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


_WARNINGS: dict = {}


def _showwarning(message, category, filename, lineno, file=None, line=None):
    key = (str(message), category.__name__, filename, lineno)
    _WARNINGS[key] = _WARNINGS.get(key, 0) + 1
    if _WARNINGS[key] == 1:
        log(f"WARNING {category.__name__} at {filename}:{lineno}: {message}")


def install_warning_hook() -> None:
    warnings.showwarning = _showwarning
    warnings.simplefilter("always")


def warning_summary() -> None:
    if not _WARNINGS:
        log("warnings: none")
        return
    log(f"warnings: {len(_WARNINGS)} distinct")
    for (msg, cat, fn, ln), n in _WARNINGS.items():
        log(f"  {n:5d}x {cat} {os.path.relpath(fn, ROOT) if fn.startswith(ROOT) else fn}:{ln}: {msg[:300]}")


def dump(out: str | None, name: str, obj) -> None:
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), "w") as fh:
            json.dump(obj, fh, indent=1, default=str)


# --------------------------------------------------------------------------------------------------
# Section: environment


def section_env(args) -> None:
    import platform

    import torch

    log(f"python {platform.python_version()} on {platform.machine()}, torch {torch.__version__}, "
        f"cuda build {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
    log(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            log(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
        import torch.distributed as dist
        log(f"nccl available: {dist.is_nccl_available()}, nccl version: "
            f"{torch.cuda.nccl.version() if dist.is_nccl_available() else None}")
    log(f"tf32: cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()}")
    log(f"cpu threads: {torch.get_num_threads()}, os.cpu_count: {os.cpu_count()}")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv"], capture_output=True, text=True, timeout=20)
        log("nvidia-smi: " + out.stdout.strip().replace("\n", " | "))
    except Exception as err:  # noqa: BLE001
        log(f"nvidia-smi: {err}")


# --------------------------------------------------------------------------------------------------
# Section: equivalence (vmap vs serial, and the exact equivalences of tests/test_engine.py)

VMAP_CASES = {  # as tests/test_engine.py
    "minibatch": {},
    "minibatch-noise": {"distributed.algorithm": "minibatch", "distributed.noise_std": 0.01},
    "local": {"distributed.local_steps": 2},
    "local-slowmo-nesterov": {"distributed.algorithm": "local", "distributed.local_steps": 2,
                              "distributed.slowmo": {"alpha": 0.8, "beta": 0.6, "nesterov": True}},
    "local-resnet-bn": {"distributed.algorithm": "local", "distributed.local_steps": 2, "model.name": "resnet",
                        "model.width": 4},
    "local-lars-uneven": {"distributed.algorithm": "local", "optim.name": "lars", "optim.lr": 1.0,
                          "data.synthetic.train_size": 370, "distributed.shards": "reshuffle"},
    "local-lamb-augment": {"distributed.algorithm": "local", "optim.name": "lamb", "optim.lr": 0.01,
                           "data.augment": True},
    "post-local": {"distributed.switch_epoch": 1, "distributed.local_steps": 2},
    "dynamic-local": {"distributed.dynamic": {"alpha": 20.0, "j_min": 1, "j_max": 8}},
    "adaptive-local": {"distributed.adaptive": {"warmup_epochs": 0.25, "p_init": 2, "sample_fraction": 0.5}},
    "decentralized-ring": {"distributed.algorithm": "decentralized", "distributed.topology": "ring"},
    "decentralized-random": {"distributed.algorithm": "decentralized", "distributed.topology": "random"},
    "decentralized-exponential": {"distributed.algorithm": "decentralized", "distributed.topology": "exponential"},
    "diloco": {"distributed.algorithm": "diloco", "distributed.local_steps": 3, "optim.name": "adamw",
               "optim.lr": 0.003},
}


def base_config(device: str, **overrides):
    from trainers.config import TrainConfig

    raw = {"data": {"dataset": "synthetic", "split": "test", "augment": False,
                    "synthetic": {"train_size": 384, "test_size": 128, "image_size": 16, "classes": 4}},
           "model": {"name": "lenet5-classic"}, "optim": {"name": "sgdm", "lr": 0.05},
           "schedule": {"name": "cosine"}, "batch_size": 16, "epochs": 2, "device": device}
    return TrainConfig.from_dict(raw, overrides)


def dconfig(device: str, algorithm: str, workers: int, **overrides):
    return base_config(device, **{"distributed.algorithm": algorithm, "distributed.workers": workers, **overrides})


class Runs:
    def __init__(self, device_name: str):
        import torch

        from trainers.steps import resolve_device

        self.torch = torch
        self.device = resolve_device(device_name)

    def build(self, cfg):
        from trainers.data import load_dataset
        from trainers.runner import make_runner

        self.torch.manual_seed(cfg.seed)
        data = load_dataset(cfg.data, cfg.seed, log=lambda _: None).to(self.device)
        return make_runner(cfg, data, self.device, None)

    def run(self, cfg, runner=None):
        runner = runner or self.build(cfg)
        for epoch in range(cfg.epochs):
            runner.train_epoch(epoch)
        self.check_device(runner)
        return runner

    def check_device(self, runner) -> None:
        """Silent CPU fallback: everything that should live on the device must."""
        want = self.device.type
        where = {"eval_model params": next(runner.eval_model().parameters()).device.type,
                 "train data": runner.batcher.data.train_x.device.type}
        if hasattr(runner, "x"):
            where["worker params X"] = runner.x.device.type
            if isinstance(runner.backend.params, dict):  # vmap: stacked parameters (serial: a list)
                where["vmap stacked params"] = next(iter(runner.backend.params.values())).device.type
            for i, g in enumerate(runner.generators[:1]):
                where["worker generator"] = g.device.type
        else:
            where["model"] = next(runner.model.parameters()).device.type
            where["generator"] = runner.generator.device.type
        bad = {k: v for k, v in where.items() if v != want}
        if bad:
            log(f"!!! DEVICE FALLBACK: expected {want}, got {bad}")

    def params(self, runner):
        state = runner.eval_model().state_dict()
        return self.torch.cat([t.detach().double().reshape(-1).cpu() for t in state.values()])

    def evaluate(self, runner, cfg):
        from trainers.steps import evaluate

        return evaluate(runner.eval_model(), runner.batcher, cfg, self.device)

    def compare(self, a, b, cfg, rtol=1e-4, atol=1e-5) -> dict:
        torch = self.torch
        pa, pb = self.params(a), self.params(b)
        ea, eb = self.evaluate(a, cfg), self.evaluate(b, cfg)
        out = {"max_abs_param": float((pa - pb).abs().max()),
               "rel_param": float((pa - pb).norm() / pa.norm().clamp_min(1e-30)),
               "eval_loss": (ea[0], eb[0]), "eval_acc": (ea[1], eb[1]),
               "d_eval_loss": abs(ea[0] - eb[0]), "d_eval_acc": abs(ea[1] - eb[1]),
               "bit_equal": bool(torch.equal(pa, pb))}
        try:
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)
            out["test_tol"] = "pass"
        except AssertionError:
            out["test_tol"] = "FAIL"
        if hasattr(a, "x") and hasattr(b, "x") and a.x.shape == b.x.shape:
            out["max_abs_workers"] = float((a.x.double() - b.x.double()).abs().max())
            try:
                torch.testing.assert_close(a.x, b.x, rtol=rtol, atol=atol)
            except AssertionError:
                out["test_tol"] = "FAIL"
        return out


def fmt_row(name: str, c: dict) -> str:
    w = c.get("max_abs_workers")
    return (f"{name:<28} max|dP|={c['max_abs_param']:.3e} rel={c['rel_param']:.2e} "
            f"max|dX_workers|={'-' if w is None else f'{w:.3e}'} "
            f"eval_loss {c['eval_loss'][0]:.6f} vs {c['eval_loss'][1]:.6f} (d={c['d_eval_loss']:.2e}) "
            f"acc {c['eval_acc'][0]:.2f} vs {c['eval_acc'][1]:.2f} "
            f"bit_equal={c['bit_equal']} test_tol(1e-4,1e-5)={c['test_tol']}")


BIG = {"model.name": "lenet5", "batch_size": 64,  # the sources' LeNet-5 (64/64 channels) on 3x32x32
       "data.synthetic": {"train_size": 2048, "test_size": 512, "image_size": 32, "classes": 10}}
BIG_CASES = {
    "minibatch": {},
    "local-J4": {"distributed.algorithm": "local", "distributed.local_steps": 4},
    "local-slowmo-nesterov": VMAP_CASES["local-slowmo-nesterov"],
    "local-resnet-bn": {"distributed.algorithm": "local", "distributed.local_steps": 4, "model.name": "resnet",
                        "model.width": 16},
    "dynamic-local": VMAP_CASES["dynamic-local"],
    "adaptive-local": VMAP_CASES["adaptive-local"],
    "decentralized-ring": VMAP_CASES["decentralized-ring"],
}


def vmap_vs_serial(R, dev, cases: dict, base: dict, label: str, results: dict, rerun: bool) -> None:
    for case, over in cases.items():
        over = {**base, **over}
        algorithm = over.pop("distributed.algorithm", case)
        try:
            t = time.perf_counter()
            cfg = dconfig(dev, algorithm, 4, **over)
            s = R.run(cfg)
            ts = time.perf_counter() - t
            t = time.perf_counter()
            v = R.run(dconfig(dev, algorithm, 4, **{**over, "distributed.backend": "vmap"}))
            tv = time.perf_counter() - t
            c = R.compare(s, v, cfg)
            ss, vs = s.algorithm_state(), v.algorithm_state()
            c["state_equal"] = all(ss.get(k) == vs.get(k) for k in ("dynamic_J", "adaptive_period"))
            c["time_serial_s"], c["time_vmap_s"] = ts, tv
            if rerun:  # the noise floor: serial against itself
                s2 = R.run(cfg)
                c["serial_rerun_max_abs"] = float((R.params(s) - R.params(s2)).abs().max())
            log(fmt_row(case, c) + f" J/period_equal={c['state_equal']}"
                + (f" serial_rerun_max|dP|={c['serial_rerun_max_abs']:.1e}" if rerun else "")
                + f" [{ts:.2f}s/{tv:.2f}s]")
            if not c["state_equal"]:
                log(f"   serial J/p {[ss.get(k) for k in ('dynamic_J', 'adaptive_period')]}\n"
                    f"   vmap   J/p {[vs.get(k) for k in ('dynamic_J', 'adaptive_period')]}")
            results[f"{label}/{case}"] = c
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            log(f"{case}: FAILED\n{tb}")
            results[f"{label}/{case}"] = {"error": tb}


def exact_pairs(R, dev, results: dict, label: str, quick: bool) -> None:
    pairs = {
        "K1 local vs centralized (augment)": (
            lambda b: base_config(dev, **{"data.augment": True}),
            lambda b: dconfig(dev, "local", 1, **{"data.augment": True, "distributed.backend": b})),
        "K1 minibatch vs centralized": (
            lambda b: base_config(dev), lambda b: dconfig(dev, "minibatch", 1, **{"distributed.backend": b})),
        "K4 minibatch B=N/K vs centralized B=N": (
            lambda b: base_config(dev, batch_size=384, epochs=4),
            lambda b: dconfig(dev, "minibatch", 4, batch_size=96, epochs=4, **{"distributed.backend": b})),
        "slowmo(1,0) vs local J=2": (
            lambda b: dconfig(dev, "local", 4, **{"distributed.local_steps": 2, "distributed.backend": b}),
            lambda b: dconfig(dev, "local", 4, **{"distributed.local_steps": 2, "distributed.backend": b,
                                                  "distributed.slowmo": {"alpha": 1.0, "beta": 0.0}})),
        "dynamic J=3 fixed vs local J=3": (
            lambda b: dconfig(dev, "local", 4, **{"distributed.local_steps": 3, "distributed.backend": b}),
            lambda b: dconfig(dev, "dynamic-local", 4, **{"distributed.dynamic": {"j_min": 3, "j_max": 3},
                                                          "distributed.backend": b})),
        "adaptive frozen p=3 vs local J=3": (
            lambda b: dconfig(dev, "local", 4, **{"distributed.local_steps": 3, "distributed.backend": b}),
            lambda b: dconfig(dev, "adaptive-local", 4, **{"distributed.backend": b, "distributed.adaptive": {
                "p_init": 3, "warmup_epochs": 0, "sample_fraction": 1.0}})),
        "decentralized K3 ring vs local J=1": (
            lambda b: dconfig(dev, "local", 3, **{"distributed.local_steps": 1, "distributed.backend": b}),
            lambda b: dconfig(dev, "decentralized", 3, **{"distributed.topology": "ring",
                                                          "distributed.backend": b})),
    }
    if quick:
        pairs = dict(list(pairs.items())[:3])
    for name, (ca, cb) in pairs.items():
        for backend in ("serial", "vmap"):
            try:
                cfg_a = ca(backend)
                a, b = R.run(cfg_a), R.run(cb(backend))
                c = R.compare(a, b, cfg_a)
                log(fmt_row(f"{name} [{backend}]", c))
                results[f"{label}/{name}/{backend}"] = c
            except Exception:  # noqa: BLE001
                tb = traceback.format_exc()
                log(f"{name} [{backend}]: FAILED\n{tb}")
                results[f"{label}/{name}/{backend}"] = {"error": tb}


def section_equiv(args) -> None:
    import torch

    R = Runs(args.device)
    dev = args.device
    results: dict = {}
    deadline = time.perf_counter() + args.equiv_budget
    cases = VMAP_CASES if not args.quick else {k: VMAP_CASES[k] for k in ("minibatch", "local", "dynamic-local")}
    big = BIG_CASES if not args.quick else {k: BIG_CASES[k] for k in ("local-J4", "local-resnet-bn")}
    gpu = R.device.type == "cuda" or args.all_modes

    def tf32(on: bool) -> str:
        torch.backends.cudnn.allow_tf32 = on
        return (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")

    parts = [
        ("vmap vs serial, K=4, 2 epochs, tests/test_engine.py config (lenet5-classic, 3x16x16, N=384, B=16)",
         lambda: vmap_vs_serial(R, dev, cases, {}, "default", results, rerun=True), True),
        ("exact equivalences of tests/test_engine.py, both backends",
         lambda: exact_pairs(R, dev, results, "default/exact", args.quick), True),
        ("vmap vs serial, K=4, 2 epochs, larger config (lenet5 64/64, 3x32x32, N=2048, B=64, 10 classes)",
         lambda: vmap_vs_serial(R, dev, big, BIG, "big-default", results, rerun=True), True),
    ]
    if gpu:
        parts += [
            ("vmap vs serial, test config, cuDNN TF32 off (strict fp32)",
             lambda: vmap_vs_serial(R, dev, cases, {}, "strict", results, rerun=False), False),
            ("vmap vs serial, larger config, cuDNN TF32 off (strict fp32)",
             lambda: vmap_vs_serial(R, dev, big, BIG, "big-strict", results, rerun=False), False),
            ("exact equivalences, cuDNN TF32 off (strict fp32)",
             lambda: exact_pairs(R, dev, results, "strict/exact", args.quick), False),
        ]
    for title, fn, tf in parts:
        if time.perf_counter() > deadline:
            log(f"--- SKIPPED (equiv time budget {args.equiv_budget}s spent): {title}")
            continue
        log(f"--- {title}; on {dev}; {tf32(tf)}")
        fn()

    if gpu and time.perf_counter() < deadline:
        # Not an equivalence: a CUDA torch.Generator draws other shuffles than a CPU one, so the trajectories
        # differ; this only shows both devices train to similar figures.
        log("--- serial K=4 on this device vs serial on cpu (different RNG streams: similar, not equal, expected)")
        C = Runs("cpu")
        for case in ["minibatch", "local", "local-resnet-bn", "decentralized-ring"]:
            over = dict(VMAP_CASES[case])
            algorithm = over.pop("distributed.algorithm", case)
            try:
                gcfg, ccfg = dconfig(dev, algorithm, 4, **over), dconfig("cpu", algorithm, 4, **over)
                g, c = R.run(gcfg), C.run(ccfg)
                eg, ec = R.evaluate(g, gcfg), C.evaluate(c, ccfg)
                d = float((R.params(g) - C.params(c)).abs().max())
                log(f"{case:<28} {dev}-vs-cpu max|dP|={d:.3e} eval_loss {eg[0]:.6f} vs {ec[0]:.6f} "
                    f"acc {eg[1]:.2f} vs {ec[1]:.2f}")
                results[f"device_vs_cpu/{case}"] = {"max_abs_param": d, "eval_device": eg, "eval_cpu": ec}
            except Exception:  # noqa: BLE001
                log(f"{case}: device-vs-cpu FAILED\n{traceback.format_exc()}")
    tf32(True)
    if R.device.type == "cuda":
        log(f"max cuda memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    dump(args.out, "equiv.json", results)


# --------------------------------------------------------------------------------------------------
# Section: dist backend (NCCL on one GPU)


def section_dist(args) -> None:
    import torch

    from trainers.train import train

    dev = args.device
    results: dict = {}
    lines: list[str] = []

    def rank_log(line: str) -> None:
        lines.append(line)
        log(f"   | {line}")

    def figures(result):
        return [(r.train_loss, r.eval_loss, r.eval_acc, r.lr) for r in result.history]

    over = {"distributed.local_steps": 2, "threads": 1}
    log(f"--- dist K=1 (algorithm local, J=2) on {dev}")
    try:
        t = time.perf_counter()
        got = train(dconfig(dev, "local", 1, **over, **{"distributed.backend": "dist"}), log=rank_log)
        log(f"dist K=1: status={got.status} device={got.device} epochs={got.epochs_completed} "
            f"in {time.perf_counter() - t:.1f}s")
        want = train(dconfig(dev, "local", 1, **over), log=lambda _: None)
        log(f"serial K=1 device={want.device}")
        for e, (g, w) in enumerate(zip(figures(got), figures(want)), 1):
            log(f"  epoch {e}: dist (train_loss, eval_loss, eval_acc, lr)={g}")
            log(f"           serial                                  ={w}  equal={g == w}")
        for k in ("comm_rounds", "comm_time_measured", "compute_time"):
            log(f"  totals {k}: dist={got.totals.get(k)} serial={want.totals.get(k)}")
        results["k1"] = {"status": got.status, "device": got.device, "dist": figures(got), "serial": figures(want),
                         "equal": figures(got) == figures(want)}
    except BaseException as err:  # noqa: BLE001
        tb = traceback.format_exc()
        log(f"dist K=1: FAILED: {type(err).__name__}: {err}\n{tb}")
        results["k1"] = {"error": tb}

    for k in (2, 4):
        log(f"--- dist K={k} on {dev} (README: 'On one GPU, K workers need vmap ... dist says so')")
        try:
            got = train(dconfig(dev, "local", k, **over, **{"distributed.backend": "dist"}), log=rank_log)
            log(f"dist K={k}: NO ERROR: status={got.status} device={got.device}")
            results[f"k{k}"] = {"status": got.status, "device": got.device}
        except BaseException as err:  # noqa: BLE001
            log(f"dist K={k}: raised {type(err).__module__}.{type(err).__name__}: {err}")
            results[f"k{k}"] = {"error_type": type(err).__name__, "error": str(err)}
    dump(args.out, "dist.json", results)


# --------------------------------------------------------------------------------------------------
# Section: throughput (trainers.bench.run_bench, as `sweeper bench` calls it)


def section_bench(args) -> None:
    import torch

    from trainers.bench import BenchSettings, run_bench

    if args.quick:
        s = BenchSettings(steps=6, warmup=2, repeats=1, batch_size=16, model="lenet5", device=args.device,
                          image_size=16, classes=10, loader_workers=0, workers=(2,))
    else:
        s = BenchSettings(device=args.device, repeats=args.bench_repeats)
    log(f"--- run_bench({s})")
    t = time.perf_counter()
    result = run_bench(s, log=log, include_workers=True)
    log(f"bench took {time.perf_counter() - t:.1f}s; threads {torch.get_num_threads()}")
    dump(args.out, "bench.json", result)


# --------------------------------------------------------------------------------------------------


SECTIONS = {"env": section_env, "equiv": section_equiv, "dist": section_dist, "bench": section_bench}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--section", choices=list(SECTIONS), default=None, help="run one section in this process")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU debug)")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--equiv-budget", type=float, default=110.0, help="seconds; later equiv parts are skipped")
    p.add_argument("--all-modes", action="store_true", help="run the cuda-only parts on cpu too (debug)")
    p.add_argument("--timeouts", default="env=40,equiv=140,dist=90,bench=170")
    args = p.parse_args()

    if args.section:
        install_warning_hook()
        log(f"=== section {args.section} on {args.device} (pid {os.getpid()})")
        try:
            SECTIONS[args.section](args)
        finally:
            warning_summary()
        return

    timeouts = dict((k, float(v)) for k, v in (item.split("=") for item in args.timeouts.split(",")))
    status = {}
    for name in SECTIONS:
        cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--device", args.device,
               "--bench-repeats", str(args.bench_repeats),
               "--equiv-budget", str(args.equiv_budget)] + (["--quick"] if args.quick else []) \
              + (["--all-modes"] if args.all_modes else []) \
              + (["--out", args.out] if args.out else [])
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)  # its own group: a timeout ends the ranks too
        try:
            rc = proc.wait(timeout=timeouts.get(name, 300))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "TIMEOUT"
        status[name] = (rc, round(time.perf_counter() - t, 1))
        log(f"=== section {name}: rc={rc} in {status[name][1]}s")
    log(f"=== summary: {status}")
    dump(args.out, "summary.json", status)


if __name__ == "__main__":
    main()
