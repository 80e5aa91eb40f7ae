"""One trial: poison -> backdoored model (cached) -> defense -> ACC / ASR / RA / DER.

A plain function of a resolved ``TrialConfig``; Ray Tune, the CLI and the tests all call it.
It reports metrics after every defense epoch through ``report`` and can be told to stop there
(ASHA). Randomness comes from generators derived from the seed per purpose (poisoning, attack
training, clean subset, defense), so a cached backdoored model and a freshly trained one leave
the rest of the trial bit-identical.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from d3tune.attacks import (
    ATTACKS,
    Backdoor,
    ImportedBackdoor,
    Trainer,
    split_state,
    with_state,
)
from d3tune.cache import Entry, ModelCache, cache_key
from d3tune.config import TrialConfig, to_dict
from d3tune.data import Dataset, half_indices, load_dataset, split_test, subset_train
from d3tune.defenses import DEFENSES, DefenseContext
from d3tune.errors import UsageError
from d3tune.eval_schedule import due_epochs, interval_for
from d3tune.metrics import EvalSets, der, evaluate
from d3tune.models import MODELS, ModelSpec, build_model
from d3tune.train import Augment, LossFn, cross_entropy, fit, make_sgd, prepare_model

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], bool | None]  # returns True to stop the defense early


def derive_seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "little") >> 1


def generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrialResult:
    metrics: dict[str, float]  # acc/asr/ra before and after, der
    history: list[dict[str, Any]]  # one report per evaluated defense epoch
    seconds: dict[str, float]  # per phase
    cache_key: str
    cache_hit: bool
    model: nn.Module = field(repr=False)
    stopped_early: bool = False


def attack_settings(cfg: TrialConfig, data: Dataset) -> dict[str, Any]:
    """Everything the backdoored model depends on, and nothing else (the cache key): the data's
    content fingerprint rather than only its name, so changed data never hits a stale model."""
    d = to_dict(cfg)
    return {"data": {"name": cfg.data.name, "data_dir": cfg.data.data_dir,
                     "fingerprint": data.fingerprint()},
            "attack": d["attack"], "arch": cfg.model.arch, "train": d["train"], "seed": cfg.seed}


def model_for(cfg: TrialConfig, data: Dataset, device: torch.device,
              normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
              ) -> nn.Module:
    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    c, h, w = data.shape
    mean, std = normalization or (data.mean, data.std)
    spec = ModelSpec(data.num_classes, c, min(h, w), mean, std)
    return prepare_model(build_model(cfg.model.arch, spec), device)  # channels_last (train.prepare_model)


def check_import(cfg: TrialConfig, imported: ImportedBackdoor,
                 data: Dataset | None = None) -> None:
    """An imported model fits the trial: its data is the trial's dataset (the defender's clean
    subset and the clean test set come from there) and its architecture the trial's."""
    src = imported.source
    if imported.dataset is None:
        raise UsageError(f"attack.result: {src} was trained on {imported.data_hint}, for which "
                         "d3tune has no loader")
    if cfg.data.name != imported.dataset:
        raise UsageError(f"data.name: {cfg.data.name!r}, but {src} holds a model trained on "
                         f"{imported.data_hint}: use --dataset {imported.dataset} and its "
                         f"--data-dir")
    if cfg.model.arch != imported.arch:
        raise UsageError(f"model.arch: {cfg.model.arch!r}, but {src} holds a "
                         f"{imported.arch!r}: use --arch {imported.arch}")
    if data is not None and (data.num_classes, data.shape) != (imported.num_classes,
                                                               imported.image_shape):
        raise UsageError(f"data.data_dir: {data.name!r} there has {data.num_classes} classes of "
                         f"{data.shape} images, {src} expects {imported.num_classes} of "
                         f"{imported.image_shape}")


def imported_model(cfg: TrialConfig, imported: ImportedBackdoor, device: torch.device,
                   normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
                   ) -> nn.Module:
    """Our architecture with the imported weights, normalising inputs as the other tool did
    (``normalization`` when the file does not say). Only ``normalize.*`` may be missing from the
    file (it lives in the other tool's data pipeline); anything else missing or extra means the
    layouts differ, and is refused rather than half-loaded."""
    c, h, w = imported.image_shape
    if imported.mean is not None and imported.std is not None:
        normalization = (imported.mean, imported.std)
    mean, std = normalization or ((0.0,) * c, (1.0,) * c)
    model = build_model(cfg.model.arch, ModelSpec(imported.num_classes, c, min(h, w), mean, std))
    try:
        missing, unexpected = model.load_state_dict(imported.state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UsageError(f"attack.result: {imported.source}: its weights do not fit d3tune's "
                         f"{cfg.model.arch!r} ({' '.join(str(exc).split())[:300]})") from None
    missing = [k for k in missing if not k.startswith("normalize.")]
    if missing or unexpected:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        what = "; ".join(p for p in (f"missing {few(missing)}" if missing else "",
                                     f"unexpected {few(unexpected)}" if unexpected else "") if p)
        raise UsageError(f"attack.result: {imported.source}: its weights do not fit d3tune's "
                         f"{cfg.model.arch!r} ({what})")
    return prepare_model(model, device)


def backdoored_model(cfg: TrialConfig, data: Dataset, device: torch.device,
                     cache: ModelCache | None,
                     on_attack_epoch: Callable[[int, dict[str, float]], None] | None
                     ) -> tuple[nn.Module, Callable[[], EvalSets], str, str]:
    """(backdoored model, a function giving the evaluation sets, cache key, where the model came
    from: "attack_train", "cache_load" or "import"): trained by the attack (through the cache),
    or imported from a file for an attack that brings its own (``load_backdoor``)."""
    entry = ATTACKS[cfg.attack.name]
    tested = split_test(data, cfg.data.test_split)
    if entry.load_backdoor is not None:
        imported = entry.load_backdoor(cfg.attack.params)
        check_import(cfg, imported, data)
        model = imported_model(cfg, imported, device, (data.mean, data.std))
        bd = [t.to(device) for t in (imported.x_bd_test, imported.y_bd_target,
                                     imported.y_bd_true)]
        if cfg.data.test_split != "all":  # the record's own poisoned set, split the same way
            keep = half_indices(bd[2], cfg.data.test_split)
            bd = [t[keep] for t in bd]
        return model, lambda: EvalSets(tested.x_test, tested.y_test, *bd), imported.key, "import"
    # The attack is lazy: poisoning the training set (and any trigger optimisation) happens only
    # when the backdoored model is built; a cache hit restores a stateful trigger instead.
    backdoor = Backdoor(data, cfg.attack, generator(cfg.seed, "poison"), device)
    settings = attack_settings(cfg, data)
    key = cache_key(settings)

    def build() -> Entry:
        model, state = backdoor.train(Trainer(lambda x, y, **hooks: train_backdoored(
            cfg, data, x, y, device, on_attack_epoch, **hooks), cfg.train.epochs,
            cfg.train.batch_size))
        return Entry(with_state(model.state_dict(), state), {"settings": settings})

    if cache is not None:
        cached, built = cache.get_or_build(key, build)
    else:
        cached, built = build(), True
    weights, state = split_state(cached.tensors)
    model = model_for(cfg, data, device)
    model.load_state_dict(weights)
    if not built:
        backdoor.restore({k: v.to(device) for k, v in state.items()})
    return (model, lambda: EvalSets(tested.x_test, tested.y_test,
                                    *backdoor.test_set(tested)), key,
            "attack_train" if built else "cache_load")


def train_backdoored(cfg: TrialConfig, data: Dataset, x: torch.Tensor, y: torch.Tensor,
                     device: torch.device,
                     on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                     loss_fn: LossFn | None = None,
                     after_step: Callable[[], None] | None = None) -> nn.Module:
    """Train a fresh model on the attacker's set. ``loss_fn``/``after_step`` let a stateful attack
    (Input-Aware) train its trigger generator in the same loop (see attacks.AttackEntry)."""
    model = model_for(cfg, data, device)
    t = cfg.train
    opt, sched = make_sgd(model.parameters(), t.lr, t.momentum, t.weight_decay, t.epochs)
    fit(model, x, y, epochs=t.epochs, batch_size=t.batch_size, optimizer=opt, scheduler=sched,
        aug=Augment(hflip=data.hflip), generator=generator(cfg.seed, "attack-train"),
        loss_fn=loss_fn or cross_entropy, after_step=after_step, on_epoch=on_epoch)
    return model


def clean_subset(cfg: TrialConfig, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's data: a seeded uniform sample of the original (unpoisoned) training set."""
    n = len(data.y_train)
    k = cfg.data.clean_count or max(1, int(round(cfg.data.clean_ratio * n)))
    idx = torch.randperm(n, generator=generator(cfg.seed, "clean-subset"))[: min(k, n)]
    idx = idx.to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]


def asha_rungs(grace_period: float, reduction_factor: float, max_t: float) -> tuple[float, ...]:
    """The epochs at which Ray's ASHAScheduler (one bracket) decides whether a trial goes on,
    computed as Ray computes them (ray/tune/schedulers/async_hyperband.py, ``_Bracket``): it
    decides on a trial's first result at or past each of them."""
    import numpy as np  # as Ray computes it, so float rounding agrees too

    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return tuple(grace_period * reduction_factor ** k for k in range(max(0, count)))


def eval_subset_sets(cfg: TrialConfig, sets: EvalSets) -> EvalSets:
    """The per-epoch evaluation sets: the fixed class-stratified subset (``eval.subset``), drawn
    from the trial's seed alone, or the full sets when ``eval.subset`` is 0."""
    if not cfg.eval.subset:
        return sets
    return sets.subset(cfg.eval.subset, generator(cfg.seed, "eval-subset"))


def phase_clock() -> tuple[dict[str, float], Callable[[str], None]]:
    """Seconds per phase, and ``lap(phase)``: the time since the last lap goes to ``phase``."""
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - clock[0]
        clock[0] = now

    return seconds, lap


def trial_data(cfg: TrialConfig, data: Dataset | None, device: torch.device) -> Dataset:
    """The trial's dataset on its device: loaded, or a caller's whole set cut as the config
    says."""
    if data is None:
        data = load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.train_size)
    elif cfg.data.train_size is not None:
        data = subset_train(data, cfg.data.train_size)
    return data.to(device)


def run_trial(cfg: TrialConfig, report: Report | None = None, cache: ModelCache | None = None,
              on_attack_epoch: Callable[[int, dict[str, float]], None] | None = None,
              data: Dataset | None = None, resume: dict[str, Any] | None = None,
              save: Callable[[dict[str, Any]], None] | None = None,
              full_eval_at: Sequence[float] = (),
              known_before: Mapping[str, float] | None = None) -> TrialResult:
    """Run one resolved trial (see config.resolve). ``save``/``resume`` checkpoint the defense
    after every epoch and continue from such a checkpoint (defenses built on ``fit``).
    ``known_before``: the backdoored model's ACC / ASR / RA on these very test sets, when the
    caller measured them already (a robust search's population phase, same config, cache entry
    and thread count): one evaluation of the full test sets fewer per member, about a tenth of
    a Fashion-MNIST member evaluation.

    Which epochs are evaluated: d3tune/eval_schedule.py (always the last and the first epoch at
    or past each of ``full_eval_at``, a scheduler's decision points, e.g. ``asha_rungs``;
    ``result.seconds`` and the log say how many).
    Epochs before the last are scored on ``eval.subset`` (config.EvalConfig), except those
    decision points: they use the full sets, so a scheduler decides on the same values as with
    full evaluation, and a trial it stops ends on full-set metrics. Each history row says which
    it was (``eval_full``: 1.0 full sets, 0.0 subset)."""
    seconds, lap = phase_clock()
    device = pick_device(cfg.device)
    data = trial_data(cfg, data, device)
    lap("load")
    model, test_sets, key, origin = backdoored_model(cfg, data, device, cache, on_attack_epoch)
    lap(origin)
    sets = test_sets()
    lap("poison")

    before = dict(known_before) if known_before is not None else evaluate(model, sets)
    lap("evaluate")
    x_clean, y_clean = clean_subset(cfg, data)

    history: list[dict[str, Any]] = []
    epoch_sets = eval_subset_sets(cfg, sets)
    last = cfg.defense.epochs
    rungs = sorted(full_eval_at)
    every = cfg.eval.every or interval_for(
        len(y_clean), len(epoch_sets.y_clean) + len(epoch_sets.y_bd_true), cfg.eval.share)
    due = due_epochs(last, every, rungs, first=cfg.eval.every is None)
    log.debug("evaluating %d of %d defense epochs (every %d%s)", len(due), last, every,
              "" if cfg.eval.every else ", from the cost model")
    stopped = False

    def on_epoch(epoch: int, logs: dict[str, float]) -> bool:
        nonlocal stopped
        if epoch not in due:
            return False
        lap("defense")
        full = epoch == last or epoch_sets is sets or bool(rungs and epoch >= rungs[0])
        while rungs and epoch >= rungs[0]:
            rungs.pop(0)
        now = evaluate(model, sets if full else epoch_sets)
        lap("evaluate")
        row = {"epoch": epoch, **now,
               "der": der(before["acc"], before["asr"], now["acc"], now["asr"]), **logs,
               **{f"{k}_before": v for k, v in before.items()}, "eval_full": float(full)}
        history.append(row)
        if report is not None and report(row) and epoch != last:
            stopped = True
            return True
        return False

    ctx = DefenseContext(num_classes=data.num_classes, head=MODELS[cfg.model.arch].head,
                         aug=Augment(hflip=data.hflip),
                         generator=generator(cfg.seed, "defense"), device=device,
                         on_epoch=on_epoch, resume=resume, save=save)
    DEFENSES[cfg.defense.name].run(model, x_clean, y_clean, cfg.defense, ctx)
    lap("defense")
    ended = bool(history) and (stopped or history[-1]["epoch"] == last)
    after = {k: history[-1][k] for k in ("acc", "asr", "ra")} \
        if ended and history[-1]["eval_full"] else evaluate(model, sets)
    lap("evaluate")
    metrics = {**{f"{k}_before": v for k, v in before.items()},
               **{f"{k}_after": v for k, v in after.items()},
               "der": der(before["acc"], before["asr"], after["acc"], after["asr"])}
    return TrialResult(metrics, history, seconds, key, origin == "cache_load", model, stopped)


def batchable(a: TrialConfig, b: TrialConfig) -> bool:
    """Can the two trials' defenses train side by side (they differ in attack and seed only)?"""
    return (a.defense == b.defense and a.model == b.model and a.data == b.data
            and a.device == b.device and DEFENSES[a.defense.name].batched is not None)


def run_trials_batched(cfgs: Sequence[TrialConfig], cache: ModelCache | None = None,
                       data: Dataset | None = None) -> list[TrialResult]:
    """Trials that differ only in attack and seed (one setting's members), their defenses
    trained as one batched computation (the defense's ``batched``; d3tune/batched.py). No
    per-epoch evaluation or report: what a robust search reads is each trial's final metrics,
    scored on the full sets as ``run_trial`` scores its last epoch. ``seconds`` are the
    group's, shared by its trials."""
    first = cfgs[0]
    entry = DEFENSES[first.defense.name]
    if entry.batched is None:
        raise UsageError(f"defense.name: {first.defense.name} has no batched form")
    if not all(batchable(first, c) for c in cfgs):
        raise ValueError("batched trials must share the defense, model, data and device")
    seconds, lap = phase_clock()
    device = pick_device(first.device)
    data = trial_data(first, data, device)
    lap("load")
    models, all_sets, befores, xs, ys, keys, hits = [], [], [], [], [], [], []
    for cfg in cfgs:
        model, test_sets, key, origin = backdoored_model(cfg, data, device, cache, None)
        lap(origin)
        sets = test_sets()
        lap("poison")
        befores.append(evaluate(model, sets))
        lap("evaluate")
        x, y = clean_subset(cfg, data)
        models.append(model), all_sets.append(sets), xs.append(x), ys.append(y)
        keys.append(key), hits.append(origin == "cache_load")
    ctxs = [DefenseContext(num_classes=data.num_classes, head=MODELS[first.model.arch].head,
                           aug=Augment(hflip=data.hflip), generator=generator(c.seed, "defense"),
                           device=device, on_epoch=lambda epoch, logs: False) for c in cfgs]
    entry.batched(models, xs, ys, first.defense, ctxs)
    lap("defense")
    out = []
    for model, sets, before, key, hit in zip(models, all_sets, befores, keys, hits):
        after = evaluate(model, sets)
        metrics = {**{f"{k}_before": v for k, v in before.items()},
                   **{f"{k}_after": v for k, v in after.items()},
                   "der": der(before["acc"], before["asr"], after["acc"], after["asr"])}
        row = {"epoch": first.defense.epochs, **after, "der": metrics["der"], "eval_full": 1.0}
        out.append(TrialResult(metrics, [row], seconds, key, hit, model))
    lap("evaluate")
    return out
