"""Where a trial's time and memory go, and how trial time grows with the data.

1. The default trial (``d3tune run`` with no options: digits, BadNets, the small CNN, D3), phase by
   phase from ``run_trial``'s ``seconds``, with the trial's peak memory: RSS (psutil where it is
   installed, else ``resource.getrusage``) and, on CUDA, ``torch.cuda.max_memory_allocated``.
2. Trial time against the clean-set size (``--clean-ratios``; the backdoored model comes from the
   cache warmed by 1, so the rows time the defense and its evaluation).
3. Trial time against the dataset size: the synthetic CIFAR-shaped set at ``--sizes`` training
   images (``D3TUNE_SYNTHETIC_TRAIN``), each with a fresh cache so attack training is timed too.
   On CPU the default is the small CNN with few epochs; on a GPU pass ``--size-arch
   preactresnet18 --size-attack-epochs 10 --sizes 5000,10000,25000,50000``.
4. ``--trials-per-gpu 1,2,4``: fractional-GPU packing, trials per hour with k trials sharing one
   GPU (Ray Tune resources {gpu: 1/k}). Without CUDA Ray is given one *logical* GPU, the trials
   run on the CPU and the output says so: that is a test of the plumbing, not a GPU measurement.

Every measured trial runs in a fresh subprocess, so its peak RSS is its own (the process's RSS
after imports is printed too: the trial's share is the difference).

    python benchmarks/trial_phases.py
    python benchmarks/trial_phases.py --clean-ratios 0.05,0.1,0.2,0.4 --sizes 500,1000,2000,4000
    python benchmarks/trial_phases.py --skip-default --skip-clean --skip-sizes --trials-per-gpu 1,2,4

Phases (``run_trial``'s names): ``load`` dataset to device; ``attack_train`` poisoning of the
training set + training the backdoored model (``cache_load`` instead on a cache hit); ``poison``
the poisoned test set; ``defense`` D3's optimisation; ``evaluate`` ACC/ASR/RA before, after every
defense epoch and at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("load", "attack_train", "cache_load", "poison", "defense", "evaluate")


def rss_now_mib() -> float:
    try:
        import psutil  # optional
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
    return float("nan")


def rss_peak_mib() -> float:
    """Peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# =============================================================================================
# One trial, measured (runs inside the subprocess)


def measure(spec: dict[str, Any], cache_dir: str | None = None, data=None) -> dict[str, Any]:
    """Run one trial and return its phases, memory and sizes (``data``: a Dataset to use
    instead of loading ``spec``'s, for tests)."""
    import torch

    from d3tune.cache import ModelCache
    from d3tune.config import resolve, trial_config
    from d3tune.data import load_dataset
    from d3tune.trial import pick_device, run_trial

    base_rss = rss_now_mib()  # after imports, before the trial
    cfg = resolve(trial_config(spec))
    cuda = pick_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cache = ModelCache(cache_dir) if cache_dir else None
    start = time.perf_counter()
    res = run_trial(cfg, cache=cache, data=data)
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    # The kernel updates the high-water mark lazily, so it can trail a fresh VmRSS reading by a
    # few pages; the peak is at least every RSS we saw.
    rss_peak = max(rss_peak_mib(), base_rss, rss_now_mib())
    vram_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    n_train = len((data or load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.train_size)).y_train)
    n_clean = cfg.data.clean_count or max(1, int(round(cfg.data.clean_ratio * n_train)))
    return {"seconds": res.seconds, "total": total, "cache_hit": res.cache_hit,
            "rss_base_mib": base_rss, "rss_peak_mib": rss_peak, "vram_peak_mib": vram_peak,
            "n_train": n_train, "n_clean": min(n_clean, n_train),
            "batch_size": cfg.defense.batch_size, "epochs": cfg.defense.epochs,
            "arch": cfg.model.arch, "dataset": cfg.data.name, "threads": torch.get_num_threads(),
            "metrics": res.metrics}


def measure_in_subprocess(spec: dict[str, Any], cache_dir: str | None,
                          env: dict[str, str] | None = None, threads: int | None = None) -> dict:
    job = json.dumps({"spec": spec, "cache": cache_dir, "threads": threads})
    out = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"trial {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# =============================================================================================
# Tables


def load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def phase_table(r: dict[str, Any]) -> str:
    sec = r["seconds"]
    rows = [[p, sec[p], f"{100 * sec[p] / r['total']:.0f} %"] for p in PHASES if p in sec]
    rows.append(["**total**", r["total"], "100 %"])
    mem = (f"peak RSS {r['rss_peak_mib']:.0f} MiB (after imports {r['rss_base_mib']:.0f} MiB)"
           + (f", peak VRAM {r['vram_peak_mib']:.0f} MiB" if r["vram_peak_mib"] is not None
              else ", VRAM: no CUDA device"))
    return table(["phase", "seconds", "share"], rows) + "\n\n" + mem


def growth_row(key: Any, r: dict[str, Any]) -> list[Any]:
    sec = r["seconds"]
    attack = sec.get("attack_train", sec.get("cache_load", 0.0))
    return [key, r["n_train"], r["n_clean"], -(-r["n_clean"] // r["batch_size"]), attack,
            sec.get("defense", 0.0), sec.get("evaluate", 0.0), r["total"], r["total"] - attack,
            r["rss_peak_mib"], r["vram_peak_mib"]]


GROWTH_HEADER = ["", "train imgs", "clean imgs", "steps/epoch", "attack s", "defense s",
                 "evaluate s", "total s", "total - attack s", "peak RSS MiB", "peak VRAM MiB"]


# =============================================================================================
# Fractional-GPU packing through Ray Tune


def packing(spec: dict[str, Any], ks: list[int], n_trials: int, cpus_per_trial: float,
            cache_dir: str) -> str:
    import ray
    import torch
    from ray import tune

    from d3tune.cache import ModelCache
    from d3tune.config import resolve, trial_config
    from d3tune.trial import run_trial

    real = torch.cuda.is_available()
    # Warm the cache once so every packed trial is a defense trial (the sweep's common case).
    run_trial(resolve(trial_config(spec)), cache=ModelCache(cache_dir))

    def trainable(config: dict[str, Any]) -> None:
        s = json.loads(json.dumps(spec))
        s.setdefault("defense", {})["lr"] = config["lr"]
        r = run_trial(resolve(trial_config(s)), cache=ModelCache(cache_dir))
        tune.report({"der": r.metrics["der"]})

    rows = []
    for k in ks:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(k * cpus_per_trial + 0.999)),
                 num_gpus=None if real else 1, include_dashboard=False, log_to_driver=False)
        try:
            lrs = [0.005 * (i + 1) for i in range(n_trials)]
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": 1.0 / k}),
                param_space={"lr": tune.grid_search(lrs)},
                run_config=tune.RunConfig(storage_path=str(Path(cache_dir) / "ray"),
                                          name=f"pack{k}"))
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: keep stdout Markdown
                results = tuner.fit()
            wall = time.perf_counter() - start
            errors = sum(1 for r in results if r.error)
        finally:
            ray.shutdown()
        rows.append([k, n_trials, errors, wall, 3600 * (n_trials - errors) / wall])
    note = ("measured on " + torch.cuda.get_device_name(0) if real else
            "UNMEASURED on a GPU: no CUDA device here, Ray had one logical GPU and the trials ran "
            "on the CPU (plumbing check only)")
    return table(["trials per GPU", "trials", "errors", "wall s", "trials/hour"], rows) + \
        f"\n\n{note}; {load()}"


# =============================================================================================
# Main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one trial, print JSON
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch CPU threads in each trial process")
    ap.add_argument("--clean-ratios", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--sizes", default="500,1000,2000,4000", help="synthetic training-set sizes")
    ap.add_argument("--size-arch", default="cnn")
    ap.add_argument("--size-attack-epochs", type=int, default=3)
    ap.add_argument("--size-defense-epochs", type=int, default=10)
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--skip-clean", action="store_true")
    ap.add_argument("--skip-sizes", action="store_true")
    ap.add_argument("--trials-per-gpu", help="e.g. 1,2,4: fractional-GPU packing via Ray Tune")
    ap.add_argument("--n-trials", type=int, default=8, help="trials per packing measurement")
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    args = ap.parse_args(argv)

    if args.one:
        job = json.loads(args.one)
        if job.get("threads"):
            import torch
            torch.set_num_threads(job["threads"])
        print(json.dumps(measure(job["spec"], job["cache"])))
        return

    import torch
    print(f"# trial phases: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}, "
          f"threads {args.threads or 'default'}; {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        digits_cache = str(Path(tmp) / "digits")
        base = {"device": args.device}
        if not args.skip_default:
            r = measure_in_subprocess(base, digits_cache, threads=args.threads)
            m = r["metrics"]
            print(f"\n## Default trial ({r['dataset']}/{r['arch']}, {r['n_clean']} clean images, "
                  f"{r['epochs']} epochs, batch {r['batch_size']}; ACC {m['acc_before']:.3f} -> "
                  f"{m['acc_after']:.3f}, ASR {m['asr_before']:.3f} -> {m['asr_after']:.3f}; "
                  f"{load()})\n")
            print(phase_table(r), flush=True)
        if not args.skip_clean:
            rows = []
            for ratio in [float(v) for v in args.clean_ratios.split(",") if v]:
                r = measure_in_subprocess({**base, "data": {"clean_ratio": ratio}}, digits_cache,
                                          threads=args.threads)
                rows.append(growth_row(ratio, r))
                print(f"  clean_ratio {ratio}: {r['total']:.1f} s [{load()}]", file=sys.stderr,
                      flush=True)
            print(f"\n## Trial time vs clean-set size (digits, default trial, cached backdoored "
                  f"model; {load()})\n")
            print(table(["clean ratio"] + GROWTH_HEADER[1:], rows), flush=True)
        if not args.skip_sizes:
            rows = []
            for n in [int(v) for v in args.sizes.split(",") if v]:
                spec = {**base, "data": {"name": "synthetic"}, "model": {"arch": args.size_arch},
                        "train": {"epochs": args.size_attack_epochs},
                        "defense": {"epochs": args.size_defense_epochs}}
                r = measure_in_subprocess(spec, str(Path(tmp) / f"synthetic-{n}"),
                                          env={"D3TUNE_SYNTHETIC_TRAIN": str(n)},
                                          threads=args.threads)
                rows.append(growth_row(n, r))
                print(f"  synthetic {n}: {r['total']:.1f} s [{load()}]", file=sys.stderr, flush=True)
            print(f"\n## Trial time vs dataset size (synthetic 3x32x32, {args.size_arch}, attack "
                  f"{args.size_attack_epochs} epochs, D3 {args.size_defense_epochs} epochs, 500 "
                  f"test images; {load()})\n")
            print(table(["synthetic train"] + GROWTH_HEADER[1:], rows), flush=True)
        if args.trials_per_gpu:
            ks = [int(v) for v in args.trials_per_gpu.split(",") if v]
            print(f"\n## Fractional-GPU packing ({args.n_trials} D3 trials per row, cached "
                  f"backdoored model)\n")
            print(packing(base, ks, args.n_trials, args.cpus_per_trial, str(Path(tmp) / "pack")))


if __name__ == "__main__":
    main()
