"""How well a per-epoch evaluation subset tracks the full test sets, and what it would do to ASHA.

Why: d3tune scores every defense epoch but the last on a fixed, class-stratified subset of the
clean and poisoned test sets (``eval.subset``, config.EvalConfig). This script chose the default
size. It runs a set of D3 trials (digits; several attacks x seeds, each a small "sweep" over the
defense learning rate) with one FULL prediction of both test sets per epoch, stored; every
candidate subset size's per-epoch ACC/ASR/DER is then a matter of indexing those predictions, for
many subset draws, at no further model cost. It reports, per candidate size:

  * per-epoch |ASR_subset - ASR_full| and |ACC_subset - ACC_full|: mean, 95th percentile, max
    (epochs before the last; the last is always scored on the full sets);
  * ASHA: Ray's asynchronous successive halving (d3tune's settings: grace period 5, reduction
    factor 2, metric DER, max) replayed on the recorded curves, trials arriving in a random order
    one after another; how many rung decisions (continue/stop) and how many trials' stopping
    epochs differ when the rung values come from the subset instead of the full sets. (d3tune's
    sweeps score ASHA's rung epochs on the full sets anyway, trial.asha_rungs; this column is
    what the subset alone would have changed.)

    python benchmarks/eval_subset.py                                # the README's figures
    python benchmarks/eval_subset.py --attacks badnets --seeds 0 --lrs 0.005,0.02 --epochs 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from d3tune.cache import ModelCache
from d3tune.config import resolve, trial_config
from d3tune.data import load_dataset
from d3tune.defenses import DEFENSES, DefenseContext
from d3tune.metrics import der, evaluate, stratified_indices
from d3tune.models import MODELS
from d3tune.train import Augment, predict
from d3tune.trial import asha_rungs, backdoored_model, clean_subset, generator, pick_device


@dataclass
class Curve:
    """One trial's per-epoch full-set predictions (epochs 1..E) and its sets' labels."""

    name: str
    group: str  # trials that one sweep's ASHA would compare: same attack, seed
    before: dict[str, float]
    clean_pred: np.ndarray  # (E, n_clean)
    bd_pred: np.ndarray  # (E, n_bd)
    y_clean: np.ndarray
    y_target: np.ndarray
    y_true: np.ndarray


def record(attack: str, seed: int, lr: float, epochs: int | None, cache: ModelCache) -> Curve:
    cfg = resolve(trial_config({"seed": seed, "device": "cpu", "attack": {"name": attack},
                                "defense": {"name": "d3", "lr": lr, **(
                                    {"epochs": epochs} if epochs else {})}}))
    dev = pick_device(cfg.device)
    data = load_dataset(cfg.data.name).to(dev)
    model, test_sets, _, _ = backdoored_model(cfg, data, dev, cache, None)
    sets = test_sets()
    before = evaluate(model, sets)
    clean, bd = [], []

    def on_epoch(epoch: int, logs: dict[str, float]) -> bool:
        clean.append(predict(model, sets.x_clean).numpy())
        bd.append(predict(model, sets.x_bd).numpy())
        return False

    x, y = clean_subset(cfg, data)
    ctx = DefenseContext(num_classes=data.num_classes, head=MODELS[cfg.model.arch].head,
                         aug=Augment(hflip=data.hflip), generator=generator(cfg.seed, "defense"),
                         device=dev, on_epoch=on_epoch)
    DEFENSES["d3"].run(model, x, y, cfg.defense, ctx)
    return Curve(f"{attack}/s{seed}/lr{lr}", f"{attack}/s{seed}", before, np.stack(clean),
                 np.stack(bd), sets.y_clean.numpy(), sets.y_bd_target.numpy(),
                 sets.y_bd_true.numpy())


def metrics(c: Curve, ci: np.ndarray | None, bi: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-epoch ACC, ASR and DER on the given subset indices (None: the full sets)."""
    cp, yc = (c.clean_pred, c.y_clean) if ci is None else (c.clean_pred[:, ci], c.y_clean[ci])
    bp, yt = (c.bd_pred, c.y_target) if bi is None else (c.bd_pred[:, bi], c.y_target[bi])
    acc = (cp == yc).mean(1)
    asr = (bp == yt).mean(1)
    d = np.array([der(c.before["acc"], c.before["asr"], a, s) for a, s in zip(acc, asr)])
    return {"acc": acc, "asr": asr, "der": d}


def asha(curves: dict[str, np.ndarray], order: list[str], grace: float, rf: float
         ) -> dict[str, list[tuple[float, bool]]]:
    """Ray's ASHA (one bracket, mode max) replayed: trials report every epoch, one trial after
    another in ``order``; each rung records the trial's value at its first epoch at or past the
    rung and stops it when below the (1 - 1/rf) percentile of the values recorded there before
    (async_hyperband._Bracket.on_result). Returns each trial's (rung, stopped?) decisions."""
    max_t = max(len(v) for v in curves.values())
    rungs = [(m, {}) for m in reversed(asha_rungs(grace, rf, max_t))]
    decisions: dict[str, list[tuple[float, bool]]] = {}
    for name in order:
        decisions[name] = []
        for epoch, value in enumerate(curves[name], start=1):
            stop = False
            for milestone, recorded in rungs:
                if epoch >= milestone and name in recorded:
                    break
                if epoch < milestone or name in recorded:
                    continue
                stop = bool(recorded) and value < np.nanpercentile(
                    list(recorded.values()), (1 - 1 / rf) * 100)
                recorded[name] = value
                decisions[name].append((milestone, stop))
                break
            if stop:
                break
    return decisions


def summarise(curves: list[Curve], sizes: list[int], draws: int, grace: float, rf: float,
              orders: int) -> list[str]:
    lines = ["| subset per set | per-epoch \\|ASR err\\| mean / p95 / max | per-epoch \\|ACC err\\| "
             "mean / p95 / max | ASHA rung decisions changed | trials stopping at another epoch |",
             "|---|---|---|---|---|"]
    full = {c.name: metrics(c, None, None) for c in curves}
    groups = sorted({c.group for c in curves})
    rng = np.random.default_rng(0)
    for n in sizes:
        asr_err, acc_err = [], []
        changed = total = moved = trials = 0
        for r in range(draws):
            sub = {}
            for c in curves:
                g = torch.Generator().manual_seed(zlib.crc32(f"{c.name}:{n}:{r}".encode()))
                ci = stratified_indices(torch.from_numpy(c.y_clean), n, g).numpy()
                bi = stratified_indices(torch.from_numpy(c.y_true), n, g).numpy()
                sub[c.name] = metrics(c, ci, bi)
                f = full[c.name]
                asr_err.append(np.abs(sub[c.name]["asr"] - f["asr"])[:-1])
                acc_err.append(np.abs(sub[c.name]["acc"] - f["acc"])[:-1])
            for grp in groups:
                names = [c.name for c in curves if c.group == grp]
                for _ in range(orders):
                    order = list(rng.permutation(names))
                    a = asha({k: full[k]["der"] for k in names}, order, grace, rf)
                    b = asha({k: sub[k]["der"] for k in names}, order, grace, rf)
                    for k in names:
                        da, db = dict(a[k]), dict(b[k])
                        for m in set(da) | set(db):
                            total += 1
                            changed += da.get(m) != db.get(m)
                        trials += 1
                        moved += (len(a[k]), a[k][-1][1] if a[k] else False) != \
                            (len(b[k]), b[k][-1][1] if b[k] else False)
        e_asr, e_acc = np.concatenate(asr_err), np.concatenate(acc_err)
        fmt = lambda e: f"{e.mean():.4f} / {np.percentile(e, 95):.4f} / {e.max():.4f}"  # noqa: E731
        lines.append(f"| {n} | {fmt(e_asr)} | {fmt(e_acc)} | {changed}/{total} "
                     f"({100 * changed / max(1, total):.1f} %) | {moved}/{trials} "
                     f"({100 * moved / max(1, trials):.1f} %) |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", default="badnets,blended,sig")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lrs", default="0.002,0.005,0.01,0.02,0.05",
                    help="defense learning rates: one ASHA population per attack x seed")
    ap.add_argument("--epochs", type=int, help="D3 epochs (default: digits' profile, 40)")
    ap.add_argument("--sizes", default="32,64,128,256")
    ap.add_argument("--draws", type=int, default=20, help="subset draws per trial and size")
    ap.add_argument("--orders", type=int, default=5, help="ASHA arrival orders per population")
    ap.add_argument("--grace", type=float, default=5)
    ap.add_argument("--rf", type=float, default=2.0)
    ap.add_argument("--cache", help="model cache folder (default: d3tune's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: nothing here is timed, and one thread wastes "
                    "least on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = ModelCache(args.cache)
    curves = []
    start = time.perf_counter()
    for attack in args.attacks.split(","):
        for seed in map(int, args.seeds.split(",")):
            for lr in map(float, args.lrs.split(",")):
                t = time.perf_counter()
                c = record(attack, seed, lr, args.epochs, cache)
                f = metrics(c, None, None)
                print(f"{c.name:<28} before ACC {c.before['acc']:.3f} ASR {c.before['asr']:.3f}"
                      f" -> ACC {f['acc'][-1]:.3f} ASR {f['asr'][-1]:.3f} DER {f['der'][-1]:.3f}"
                      f"  ({time.perf_counter() - t:.1f} s, load avg "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
                curves.append(c)
    c0 = curves[0]
    print(f"\n# {len(curves)} trials in {len({c.group for c in curves})} ASHA populations, "
          f"{c0.clean_pred.shape[0]} epochs, {len(c0.y_clean)} clean + {len(c0.y_true)} poisoned "
          f"test images; {args.draws} subset draws per trial and size, {args.orders} arrival "
          f"orders; ASHA grace {args.grace:g}, rf {args.rf:g}, rungs "
          f"{asha_rungs(args.grace, args.rf, c0.clean_pred.shape[0])}; recorded in "
          f"{time.perf_counter() - start:.0f} s\n")
    spread = statistics.median(float(np.ptp([metrics(c, None, None)["der"][e] for c in curves
                                             if c.group == g]))
                               for g in {c.group for c in curves}
                               for e in range(c0.clean_pred.shape[0]))
    print(f"median spread of full-set DER within a population at one epoch: {spread:.4f}\n")
    for line in summarise(curves, [int(s) for s in args.sizes.split(",")], args.draws,
                          args.grace, args.rf, args.orders):
        print(line)


if __name__ == "__main__":
    main()
