"""Member evaluations per core-hour: where one goes, how near the training floor it runs, and
what batched members (d3tune/batched.py), bf16 autocast and torch.compile change.

A member evaluation is one (setting, attack, seed) defense run inside a robust search; every
answer d3tune gives (robust defaults, leaderboards, replicated P(A > B)) is hundreds of them.
Per dataset and defense, all measured in the same run, side by side:

1. **Through the real robust search** (Ray Tune, Optuna, MLflow on SQLite, the model cache
   warm): a small population at the defense's shipped settings and a second sampled setting,
   ``top_k`` = budget so exact pruning never stops a setting (the count is fixed). Printed:
   member evaluations per core-hour, and the split of one evaluation into dispatch and
   bookkeeping (Ray, Tune, the searcher, MLflow: the search's wall x concurrency less the
   members' own time), then, from ``run_trial``'s phase clock on the same member config:
   data, cache load, poisoning the test set, training, evaluation.
2. **The floor**: the defense's training loop alone (model and clean set already in memory),
   at the same settings and thread count. Overhead = 1 - (training + final evaluation) / one
   member evaluation in the search.
3. **Batched members** (``member_batch``): the same members one by one and as one batched
   computation, at each thread count: the speed-up and the largest |DER| difference (float
   rounding: a grouped convolution sums in another order; tests/test_batched.py shows the
   two agree to 1e-6 in float64).
4. **Precision and compilation**: the floor again with ``D3TUNE_AMP=bf16`` and with
   ``D3TUNE_COMPILE=1`` (compile time counted against the member's length), with the final
   ACC / ASR against fp32.

    python benchmarks/member_throughput.py
    python benchmarks/member_throughput.py --datasets digits --defenses d3 --threads 1
    python benchmarks/member_throughput.py --device cuda --member-batch 18   # a lent GPU

Prints date, load average and thread counts. Figures are the machine's; take them quiet.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ATTACKS = {"digits": ["badnets", "blended", "wanet", "trojan", "lf", "input_aware"],
           "fashion_mnist": ["badnets", "blended", "wanet"]}


def load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def spec_for(dataset: str, defense: str, seeds: list[int], root: Path, budget: int,
             device: str) -> Any:
    from d3tune.defenses import DEFENSES
    from d3tune.specs.robust_spec import robust_plan

    return robust_plan({
        "name": f"throughput_{dataset}_{defense}", "defense": defense,
        "base": {"device": device},
        "space": dict(DEFENSES[defense].space),
        "population": {"attacks": ATTACKS[dataset], "datasets": [dataset], "seeds": seeds},
        "holdout_seeds": [max(seeds) + 1], "budget": budget, "top_k": budget,
        "references": [{"name": "default", "setting": {}}],
        "start_with": ["default"],  # the shipped setting first
        "max_concurrent": 2, "resources": {"cpu": 1},
        "storage": str(root / "runs"), "experiment": "throughput"}, "member_throughput")


def through_search(spec: Any, threads: int) -> dict[str, float]:
    """The search phase of a real robust search: member evaluations, their own seconds, the
    phase's wall clock."""
    from d3tune.search.robust_driver import robust_search

    spec = replace(spec, resources=replace(spec.resources, cpu=threads), max_concurrent=1
                   if threads > 1 else 2)
    outcome = robust_search(spec, out=Path(spec.storage) / f"{spec.name}.yaml")
    search = outcome.search
    members = int(search["members_done"].sum())
    member_s = float(sum(sum(float(v) for k, v in r.items() if k.startswith("seconds."))
                         for r in outcome_metrics(outcome)))
    return {"members": members, "wall": outcome.seconds["search"],
            "member_s": member_s, "concurrency": spec.max_concurrent, "threads": threads}


def outcome_metrics(outcome: Any) -> list[dict[str, float]]:
    """Every search trial's last result (its per-member seconds), read from Tune's results."""
    import json

    rows = []
    for result in Path(outcome.spec.paths.experiment_dir).glob("*/result.json"):
        lines = [x for x in result.read_text().splitlines() if x.strip()]
        if lines:
            rows.append(json.loads(lines[-1]))
    return rows


def phases(spec: Any, threads: int, repeats: int = 3) -> tuple[dict[str, float], float]:
    """``run_trial``'s phase clock on the first member at the shipped setting, in process:
    the median of the runs after the first (what a member costs in a worker that already ran
    one: Tune reuses its workers), and how much longer the first run took (a worker's one-off
    warm-up: the dataset's first load, torch's first kernels)."""
    import torch

    from d3tune.cache import ModelCache
    from d3tune.specs.robust_spec import member_config
    from d3tune.trial import run_trial

    torch.set_num_threads(threads)
    cfg = member_config(spec, spec.members[0], {})
    runs = [run_trial(cfg, cache=ModelCache(spec.cache_dir)).seconds
            for _ in range(max(2, repeats))]
    steady = {k: statistics.median(r.get(k, 0.0) for r in runs[1:]) for k in runs[0]}
    return steady, sum(runs[0].values()) - sum(steady.values())


def floor(spec: Any, threads: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The defense's training loop alone on the first member, model and data in memory: the
    time no search can go below. ``env``: D3TUNE_AMP / D3TUNE_COMPILE for this measurement."""
    import torch

    from d3tune.cache import ModelCache
    from d3tune.data import load_dataset
    from d3tune.defenses import DEFENSES, DefenseContext
    from d3tune.metrics import evaluate
    from d3tune.models import MODELS
    from d3tune.specs.robust_spec import member_config
    from d3tune.train import Augment
    from d3tune.trial import backdoored_model, clean_subset, generator, pick_device

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        torch.set_num_threads(threads)
        cfg = member_config(spec, spec.members[0], {})
        device = pick_device(cfg.device)
        data = load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.train_size).to(device)
        model, sets, _, _ = backdoored_model(cfg, data, device, ModelCache(spec.cache_dir), None)
        sets = sets()
        x, y = clean_subset(cfg, data)
        times, result = [], {}
        for _ in range(2):  # the first pays any compilation; the second is the steady state
            m = copy.deepcopy(model)
            ctx = DefenseContext(num_classes=data.num_classes, head=MODELS[cfg.model.arch].head,
                                 aug=Augment(hflip=data.hflip),
                                 generator=generator(cfg.seed, "defense"), device=device,
                                 on_epoch=lambda e, logs: False)
            t = time.perf_counter()
            DEFENSES[cfg.defense.name].run(m, x, y, cfg.defense, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            result = evaluate(m, sets)
            times.append(time.perf_counter() - t)
        return {"first": times[0], "train": times[2], "eval": times[3], **result}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def batched(spec: Any, threads: int, group: int) -> dict[str, float]:
    """The same members one by one and ``group`` at a time, side by side."""
    from d3tune.search.robust_trainable import run_members

    out = {}
    rows = {}
    for g in (1, group):
        t = time.perf_counter()
        rows[g] = run_members(replace(spec, member_batch=g), spec.members, {}, threads=threads)
        out[g] = time.perf_counter() - t
    diff = max(abs(a["der"] - b["der"]) for a, b in zip(rows[1], rows[group]))
    return {"one": out[1], "batched": out[group], "members": len(spec.members),
            "max_der_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="digits,fashion_mnist")
    ap.add_argument("--defenses", default="d3,ft")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--budget", type=int, default=6,
                    help="settings in the search (section 1); enough that start-up amortises")
    ap.add_argument("--member-batch", type=int, default=0,
                    help="members per batched group (default: the whole population)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", default="", help="sections to skip: search,floor,batched,precision")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    threads = [int(t) for t in args.threads.split(",")]
    print(f"# member_throughput {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,"
          f" {os.cpu_count()} CPUs, {load()}, device {args.device}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="d3t_throughput_"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for dataset in args.datasets.split(","):
        for defense in args.defenses.split(","):
            spec = spec_for(dataset, defense, [0], root / f"{dataset}_{defense}", args.budget,
                            args.device)
            head = f"{dataset} {defense}"
            ph, warmup = phases(spec, threads[0])  # also warms the model cache for what follows
            print(f"\n## {head}: {len(spec.members)} members; phases of one member evaluation "
                  f"in a warm worker ({threads[0]} thread): "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in ph.items())
                  + f"; a worker's first member takes {warmup:.2f}s longer (once per worker)",
                  flush=True)
            fl = floor(spec, threads[0]) if "floor" not in skip else None
            if fl:
                print(f"{head}: floor ({threads[0]} thread): training {fl['train']:.2f}s, final "
                      f"evaluation {fl['eval']:.2f}s ({load()})", flush=True)
            if "search" not in skip:
                s = through_search(replace(spec, name=f"{spec.name}_t{threads[0]}"), threads[0])
                per = s["wall"] * s["concurrency"] / s["members"]
                own = s["member_s"] / s["members"]
                print(f"{head}: search: {s['members']} member evaluations in {s['wall']:.1f}s, "
                      f"{s['concurrency']} at a time: {3600 / per:.0f} per core-hour; "
                      f"{per:.2f} core-s each, of which the member's own {own:.2f}s; "
                      f"dispatch and bookkeeping {1 - own / per:.1%} ({load()})", flush=True)
                if fl:
                    work = fl["train"] + fl["eval"]
                    print(f"{head}: overhead (all but training and final evaluation): "
                          f"{1 - work / per:.1%} of a member evaluation (target <= 10 %)",
                          flush=True)
            if "batched" not in skip:
                for t in threads:
                    b = batched(spec, t, args.member_batch or len(spec.members))
                    print(f"{head}: batched ({t} thread{'s' if t > 1 else ''}): "
                          f"{b['members']} members one by one {b['one']:.1f}s, as one batch "
                          f"{b['batched']:.1f}s: {b['one'] / b['batched']:.2f}x; "
                          f"max |DER diff| {b['max_der_diff']:.4f} ({load()})", flush=True)
            if "precision" not in skip and fl:
                for label, env in (("bf16", {"D3TUNE_AMP": "bf16"}),
                                   ("compile", {"D3TUNE_COMPILE": "1"})):
                    try:
                        p = floor(spec, threads[0], env)
                    except Exception as exc:  # a backend that cannot compile here: say so
                        print(f"{head}: {label}: failed ({type(exc).__name__}: {exc})"[:300])
                        continue
                    print(f"{head}: {label}: first run {p['first']:.2f}s (with any compile), "
                          f"steady {p['train']:.2f}s vs fp32 {fl['train']:.2f}s: "
                          f"{fl['train'] / p['train']:.2f}x steady, {fl['train'] / p['first']:.2f}x "
                          f"counting compile; ACC {p['acc']:.4f} vs {fl['acc']:.4f}, "
                          f"ASR {p['asr']:.4f} vs {fl['asr']:.4f} ({load()})", flush=True)


if __name__ == "__main__":
    main()
