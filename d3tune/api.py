"""d3tune from Python: defend a model you trained yourself, evaluate it, run trials, sweeps,
robust searches and leaderboards, and report on them.

These are the verbs ``import d3tune`` offers (``d3tune/__init__.py`` imports this module only
when one of them is first used, so ``import d3tune`` stays cheap).

Input contract, the same for ``defend`` and ``evaluate``:

- Images are NCHW tensors of *pixels*: uint8 in 0..255, or float in [0, 1] (float pixels are
  quantised to uint8 for the defense, which works on 8-bit images as a trial does). Labels are
  integer tensors. Never pass normalised images: a float tensor outside [0, 1] is refused.
- d3tune's own models (built by ``d3tune.models.build_model``) normalise inside their first
  module, so they get the pixels as they are.
- Any other ``nn.Module`` (a "foreign" model) gets float pixels in [0, 1], standardised with
  ``normalize=(mean, std)`` when given: exactly what a model trained on ``x.float() / 255``
  (or on ``(x / 255 - mean) / std``) expects. The conversion is a forward pre-hook on d3tune's
  working copy and is removed before the model is returned, so the defended model keeps its
  class, its module names and its own input format. Why pixels and not "whatever your model
  takes": augmentation pads with black pixels, and I-BAU and SAU search adversarial
  perturbations in pixel space (bounded and clipped to [0, 1]); all defenses then mean the same
  thing for every model.

Layer-based knobs name modules of *your* model (``select_layer="fc"`` for D3,
``layers="layer2,layer3,layer4"`` for NAD). When a model is not one of ours, its classifier head
(D3's selected layer, the layer FP and FST work on) defaults to its last ``nn.Linear``; the
choice is logged by module name.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from d3tune.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

    from d3tune.config import TrialConfig
    from d3tune.data import Dataset
    from d3tune.search.leaderboard_driver import LeaderboardOutcome
    from d3tune.search.replicate_driver import ReplicatedOutcome
    from d3tune.search.robust_driver import RobustOutcome
    from d3tune.specs.robust_spec import RobustSpec
    from d3tune.trial import TrialResult

log = logging.getLogger("d3tune.api")

# ---------------------------------------------------------------------------------------------
# Inputs


def _pixels(x: Any, name: str) -> torch.Tensor:
    """Check the pixel contract (module doc); returns a tensor, float or uint8, unchanged."""
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"{name}: expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise UsageError(f"{name}: expected NCHW images (4 dimensions), got shape "
                         f"{tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise UsageError(f"{name}: expected uint8 (0..255) or float (0..1) pixels, got {x.dtype}")
    if len(x):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise UsageError(f"{name}: float pixels must lie in [0, 1], got {lo:.3g}..{hi:.3g}; "
                             "pass un-normalised images and normalize=(mean, std)")
    return x


def _labels(y: Any, name: str, n: int) -> torch.Tensor:
    if isinstance(y, int):
        return torch.full((n,), y, dtype=torch.int64)
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dim() != 1:
        raise UsageError(f"{name}: expected a 1-D integer tensor of labels")
    if len(y) != n:
        raise UsageError(f"{name}: {len(y)} labels for {n} images")
    return y.long()


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def is_own_model(model: nn.Module) -> bool:
    """A d3tune model: its first step normalises pixels (``models.Normalize``)."""
    from d3tune.models import Normalize

    return isinstance(getattr(model, "normalize", None), Normalize)


@contextlib.contextmanager
def pixel_input(model: nn.Module, normalize: tuple[Sequence[float], Sequence[float]] | None,
                channels: int) -> Iterator[nn.Module]:
    """Let ``model`` take d3tune's pixels for the duration (module doc): nothing for our own
    models; for a foreign one, a forward pre-hook doing what ``models.Normalize`` does."""
    from d3tune.models import Normalize

    if is_own_model(model):
        if normalize is not None:
            raise UsageError("normalize: this is a d3tune model, it normalises its input itself; "
                             "drop normalize")
        yield model
        return
    mean, std = normalize if normalize is not None else ((0.0,) * channels, (1.0,) * channels)
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"normalize: expected (mean, std) with {channels} values each, got "
                         f"{len(mean)} and {len(std)}")
    param = next(model.parameters(), None)
    norm = Normalize(mean, std).to(param.device if param is not None else "cpu")
    handle = model.register_forward_pre_hook(lambda m, args: (norm(args[0]), *args[1:]))
    try:
        yield model
    finally:
        handle.remove()


def default_head(model: nn.Module) -> tuple[str | None, str]:
    """(classifier head's module name, why): the registered head of a model built by d3tune,
    else the model's last ``nn.Linear`` (None when it has none)."""
    from d3tune.models import ARCH_ATTR, MODELS

    arch = getattr(model, ARCH_ATTR, None)
    if isinstance(arch, str) and arch in MODELS:
        return MODELS[arch].head, f"the head registered for {arch!r}"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (linears[-1], f"the last nn.Linear of {type(model).__name__}") if linears \
        else (None, f"{type(model).__name__} has no nn.Linear")


def _head_for(model: nn.Module, defense: str, params: Any) -> str:
    """The head handed to the defense; fails in one line (naming the knob) only when the
    defense needs a head the model does not have."""
    from d3tune.defenses import DEFENSES

    head, why = default_head(model)
    entry = DEFENSES[defense]
    if not entry.uses_head:
        return head or ""
    knob = entry.head_knob
    if knob is not None and getattr(params, knob, None):
        return head or ""  # the knob wins; the defense reads it
    if head is None:
        fix = f"name one with {knob}=..." if knob else "it needs an nn.Linear classifier head"
        raise UsageError(f"{knob or 'model'}: {why} to default to; {fix}")
    log.info("%s: classifier head %r (%s)", defense, head, why)
    return head


# ---------------------------------------------------------------------------------------------
# Verbs


def defend(model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor, defense: str = "d3",
           *, seed: int = 0, device: str = "auto",
           normalize: tuple[Sequence[float], Sequence[float]] | None = None, hflip: bool = False,
           **knobs: Any) -> nn.Module:
    """Defend ``model`` with ``defense`` using the small clean set ``(clean_x, clean_y)``.

    Returns a defended copy (in eval mode, on ``device``); the model passed in is not changed.
    ``knobs`` are the defense's fields as in a spec's ``defense:`` section: the common ones
    (``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay``; unset ones take
    d3tune's general defaults, 100 epochs, lr 0.01, batch 256) and the defense's own (D3:
    ``eps``, ``lmd``, ``p``, ``init``, ``select_layer``, ``radius``). ``hflip`` adds mirror
    augmentation (only where your classes are mirror-symmetric). Inputs: see the module doc.
    The same model, data, knobs and seed give the same weights as a d3tune trial.
    """
    from d3tune.config import build
    from d3tune.data import Profile
    from d3tune.defenses import DEFENSES, DefenseConfig, DefenseContext
    from d3tune.train import Augment, prepare_model
    from d3tune.trial import generator, pick_device

    if not isinstance(model, nn.Module):
        raise UsageError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    try:
        entry = DEFENSES[defense]
    except UsageError as exc:
        raise UsageError(f"defense: {exc}") from None
    cfg = build(DefenseConfig, {"name": defense, **knobs}, "defense", extra=entry.params)
    prof = Profile()
    cfg = replace(cfg, epochs=cfg.epochs or prof.defense_epochs, lr=cfg.lr or prof.defense_lr,
                  batch_size=cfg.batch_size or prof.defense_batch_size)
    x = _pixels(clean_x, "clean_x")
    y = _labels(clean_y, "clean_y", len(x))
    if not len(x):
        raise UsageError("clean_x: no images")
    dev = pick_device(device)
    work = prepare_model(copy.deepcopy(model), dev)
    x, y = _as_uint8(x).to(dev), y.to(dev)
    head = _head_for(work, defense, cfg.params)
    with pixel_input(work, normalize, x.shape[1]):
        num_classes = _num_classes(work, x)

        def on_epoch(epoch: int, logs: dict[str, float]) -> bool:
            log.debug("%s epoch %d/%d %s", defense, epoch, cfg.epochs, logs)
            return False

        ctx = DefenseContext(num_classes=num_classes, head=head, aug=Augment(hflip=hflip),
                             generator=generator(seed, "defense"), device=dev, on_epoch=on_epoch)
        entry.run(work, x, y, cfg, ctx)
    return work.eval()


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """One forward pass on two clean images (eval mode: no statistics change): the number of
    classes, and a clear error now if the model does not take these inputs."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as exc:
        raise UsageError(f"model: a forward pass on clean_x[:2] ({tuple(x[:2].shape)}, "
                         f"{x.dtype}) failed: {' '.join(str(exc).split())[:200]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UsageError("model: expected logits of shape (N, classes) from a forward pass")
    return int(out.shape[1])


def evaluate(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, bd_x: torch.Tensor,
             bd_target: torch.Tensor | int, bd_true: torch.Tensor, *,
             normalize: tuple[Sequence[float], Sequence[float]] | None = None
             ) -> dict[str, float]:
    """ACC on ``(test_x, test_y)``; ASR (prediction == ``bd_target``, a tensor or one class for
    all) and RA (prediction == ``bd_true``) on the triggered images ``bd_x``. Pixels as for
    ``defend`` (module doc); computed on the model's device, in eval mode."""
    from d3tune.metrics import EvalSets
    from d3tune.metrics import evaluate as metrics_of

    x, bx = _pixels(test_x, "test_x"), _pixels(bd_x, "bd_x")
    y = _labels(test_y, "test_y", len(x))
    target, true = _labels(bd_target, "bd_target", len(bx)), _labels(bd_true, "bd_true", len(bx))
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    sets = EvalSets(*(t.to(dev) for t in (x, y, bx, target, true)))
    with pixel_input(model, normalize, x.shape[1]):
        return metrics_of(model, sets)


def _trial_config(config: Any) -> TrialConfig:
    from d3tune.config import TrialConfig, flatten, resolve, trial_config, unflatten

    if isinstance(config, TrialConfig):
        return resolve(config)
    if not isinstance(config, Mapping):
        raise UsageError(f"config: expected a mapping of trial fields or a TrialConfig, got "
                         f"{type(config).__name__}")
    return resolve(trial_config(unflatten(flatten(config))))  # nested or dotted keys


def run_trial(config: Any, *, cache_dir: str | Path | None = None, use_cache: bool = True,
              data: Dataset | None = None) -> TrialResult:
    """One trial, as ``d3tune run`` does it minus the MLflow run and the result folder.

    ``config``: trial fields as a nested or dotted mapping (``{"attack": {"name": "badnets"},
    "defense.epochs": 5}``) or a ``TrialConfig``; unset fields take the dataset's profile.
    The backdoored model goes through the same cache as the CLI's (``cache_dir``, default
    $D3TUNE_CACHE_DIR or ~/.cache/d3tune/models). ``data`` replaces the loaded dataset (a subset,
    say). Returns a ``TrialResult``: ``metrics``, per-epoch ``history``, the defended ``model``.
    """
    from d3tune.cache import ModelCache
    from d3tune.specs.inputs import check_paths
    from d3tune.trial import run_trial as run

    cfg = _trial_config(config)
    if data is None:
        check_paths(cfg)
    return run(cfg, cache=ModelCache(cache_dir) if use_cache else None, data=data)


def trial_fields(*, config_file: str | Path | None = None,
                 flags: Mapping[str, Any] | None = None, sets: Sequence[str] = (),
                 attack_result: str | Path | None = None,
                 eval_full: bool = False) -> dict[str, Any]:
    """The nested trial dict ``d3tune run`` builds, in its order of precedence: the
    ``config_file`` (YAML trial fields), then ``flags`` (dotted field -> value; None leaves it
    unset), then ``sets`` ("KEY=VALUE", the value read as YAML), then a BackdoorBench record's
    attack, dataset, architecture and (without a folder) its recorded data folder. Raises
    UsageError naming the flag or file at fault."""
    from d3tune.config import flatten, unflatten
    from d3tune.yamlio import load_yaml

    base: dict[str, Any] = {}
    if config_file:
        loaded = load_yaml(config_file)
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"{config_file}: expected a mapping of trial fields at the top")
        base = flatten(loaded or {})
    base.update({k: v for k, v in (flags or {}).items() if v is not None})
    if eval_full:
        base["eval.subset"] = 0  # every epoch on the full test sets
        base["eval.every"] = 1
    base.update(dict(_key_value(s) for s in sets))
    if attack_result:
        base.update(_record_fields(str(attack_result), base))
    return unflatten(base)


def _key_value(text: str) -> tuple[str, Any]:
    """--set a.b=value: the value is read as YAML (numbers, booleans, null, lists)."""
    from d3tune.yamlio import parse_yaml

    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected KEY=VALUE, e.g. defense.eps=0.2")
    key, raw = text.split("=", 1)
    return key.strip(), parse_yaml(raw, f"--set {key}") if raw.strip() else None


def _record_fields(path: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """--attack-result PATH: the BackdoorBench record's attack; its dataset and architecture
    unless given (a mismatch is reported by the input check that follows); without
    --data-dir, the folder the record says its clean data came from, where it can be found."""
    from d3tune.attacks.imported import NAME
    from d3tune.data import DATASETS
    from d3tune.specs.records import record_data_dir, record_fields

    if base.get("attack.name", NAME) != NAME:
        raise UsageError(f"--attack-result: the record brings its own attack; drop --attack "
                         f"{base['attack.name']}")
    fields, data_path = record_fields(path)
    out = {k: v for k, v in fields.items() if k not in base or k.startswith("attack.")}
    dataset = base.get("data.name", fields["data.name"])
    if ("data.data_dir" not in base and dataset == fields["data.name"]
            and DATASETS[dataset].needs_data_dir):
        out["data.data_dir"] = record_data_dir(fields["attack.result"], dataset, data_path,
                                               "--data-dir")
    return out


def run(config: Any, *, out: str | Path = "d3tune_results/runs",
        cache_dir: str | Path | None = None, use_cache: bool = True,
        experiment: str = "d3tune", use_mlflow: bool = True,
        threads: int | None = None) -> int:
    """``d3tune run``: one trial with progress bars, its result.json and defended weights
    (safetensors) under ``out``, and an MLflow run (unless ``use_mlflow`` is False).
    ``config`` as for ``run_trial``; ``threads`` pins torch's CPU threads (results depend on
    it, and the run records the count). Returns the exit status (0). Raises UsageError for bad
    input, before any output."""
    from d3tune import runner

    return runner.run_and_log(_trial_config(config), out_dir=out,
                              cache_dir=str(cache_dir) if cache_dir else None,
                              use_cache=use_cache, experiment=experiment,
                              use_mlflow=use_mlflow, threads=threads)


def _plan(spec: Any, kind: str, num_samples: int | None = None,
          dataset: str | None = None, data_dir: str | Path | None = None,
          paths: Mapping[str, str | None] | None = None):
    """A validated sweep or ablation plan with the caller's overrides, its inputs checked."""
    from d3tune.specs.inputs import check_inputs
    from d3tune.specs.sweep_spec import (
        ablation_plan,
        load_plan,
        sweep_plan,
        with_absolute_paths,
    )

    if isinstance(spec, (str, Path)):
        plan = load_plan(spec, kind, num_samples)
    elif isinstance(spec, Mapping):
        plan = with_absolute_paths(sweep_plan(dict(spec), "sweep", num_samples) if kind == "sweep"
                                   else ablation_plan(dict(spec), "ablation"))
    else:
        raise UsageError(f"spec: expected a YAML path or a mapping, got {type(spec).__name__}")
    plan = _with_data(plan, dataset, data_dir)
    plan = replace(plan, **_path_changes(paths or {}))
    check_inputs(plan)
    return plan


def _with_data(plan: Any, dataset: str | None, data_dir: str | Path | None) -> Any:
    """``--dataset`` / ``--data-dir``: every trial of the plan on that dataset or folder."""
    from d3tune.config import flatten, trial_config, unflatten
    from d3tune.specs.fields import absolute

    if not dataset and not data_dir:
        return plan
    base = flatten(plan.base)
    if dataset:
        base["data.name"] = dataset
    if data_dir:
        base["data.data_dir"] = absolute(str(data_dir))
    try:
        trial_config(unflatten(base))
    except UsageError as exc:
        raise UsageError(f"--dataset/--data-dir: {exc}") from None
    return replace(plan, base=unflatten(base))


def sweep(spec: Any, *, num_samples: int | None = None, resume: bool = False,
          address: str | None = None, dataset: str | None = None,
          data_dir: str | Path | None = None, **paths: str | None) -> pd.DataFrame:
    """``d3tune sweep``: ``spec`` is a YAML path or the same fields as a mapping (its ``name``
    defaults to "sweep"). ``dataset``/``data_dir`` move every trial to that dataset or folder;
    ``paths``: ``storage``, ``cache_dir``, ``experiment`` overrides. Returns one row per trial
    (its sampled fields and last metrics). Raises UsageError for bad input, before Ray
    starts."""
    from d3tune.search.sweep_driver import run_plan

    return run_plan(_plan(spec, "sweep", num_samples, dataset, data_dir, paths), resume=resume,
                    address=address)


def ablate(spec: Any, *, resume: bool = False, address: str | None = None,
           dataset: str | None = None, data_dir: str | Path | None = None,
           **paths: str | None) -> pd.DataFrame:
    """``d3tune ablate``: a grid spec (YAML path or mapping, ``name`` defaults to "ablation"),
    overrides as for ``sweep``. Returns one row per cell. Raises UsageError for bad input,
    before Ray starts."""
    from d3tune.search.sweep_driver import run_plan

    return run_plan(_plan(spec, "ablation", None, dataset, data_dir, paths), resume=resume,
                    address=address)


def robust(spec: str | Path, *, budget: int | None = None, time_budget_s: float | None = None,
           resume: bool = False, address: str | None = None, out: str | Path | None = None,
           data_dir: str | Mapping[str, str] | None = None, replicates: int | None = None,
           **paths: str | None) -> RobustOutcome | ReplicatedOutcome:
    """``d3tune robust``: search ``spec``'s defense settings for the best worst-case DER over its
    population (the ACC budget a constraint), then confirm the best on the holdout seeds.
    ``data_dir``: the folder of the population's one dataset, or {dataset: folder}, overriding
    the spec's (``--data-dir``). ``paths``: ``storage``, ``cache_dir``, ``experiment``
    overrides. Returns the ``RobustOutcome`` (``chosen``: the confirmed setting; ``search``,
    ``holdout``: the rows). ``replicates`` (``--replicates``, else the spec's): K > 1 runs K
    whole searches and returns a ``ReplicatedOutcome`` (the procedure's expected holdout worst
    case with its interval, one summary per replicate). Raises UsageError for bad input, before
    Ray starts."""
    from d3tune.search.replicate_driver import run_replicated
    from d3tune.search.robust_driver import robust_search
    from d3tune.specs.inputs import check_members
    from d3tune.specs.robust_spec import load_robust, replicate_specs

    search = adjusted_robust(load_robust(spec, data_dirs(data_dir)), budget, time_budget_s,
                             resume, paths)
    if replicates is not None:
        search = search.with_replicates(replicates)
    for one in replicate_specs(search):  # every replicate's own members
        check_members(one)
    if search.replicates > 1:
        return run_replicated(search, resume=resume, address=address, out=out)
    return robust_search(search, resume=resume, address=address, out=out)


def adjusted_robust(spec: RobustSpec, budget: int | None, time_budget_s: float | None,
                    resume: bool, paths: Mapping[str, str | None]) -> RobustSpec:
    """A robust spec with the caller's overrides (the CLI's flags), validated."""
    if budget is not None:
        if resume:
            raise UsageError("--budget: a resumed search keeps the budget it started with")
        spec = spec.with_budget(budget)
    changes: dict[str, Any] = _path_changes(paths)
    if time_budget_s is not None:
        if not time_budget_s > 0:
            raise UsageError(f"--time-budget-s: expected a number of seconds > 0, got "
                             f"{time_budget_s}")
        changes["time_budget_s"] = time_budget_s
    return replace(spec, **changes)


def data_dirs(data_dir: str | Path | Mapping[str, str] | None) -> dict[str | None, str]:
    """``data_dir`` as robust and leaderboard specs take it: {dataset: folder}, where the key
    None means the population's one dataset."""
    if data_dir is None:
        return {}
    if isinstance(data_dir, (str, Path)):
        return {None: str(data_dir)}
    if not isinstance(data_dir, Mapping):
        raise UsageError(f"data_dir: expected a folder or {{dataset: folder}}, got {data_dir!r}")
    return {str(k): str(v) for k, v in data_dir.items()}


def _path_changes(paths: Mapping[str, str | None]) -> dict[str, str]:
    from d3tune.specs.inputs import path_changes

    unknown = set(paths) - {"storage", "cache_dir", "experiment"}
    if unknown:
        raise UsageError(f"{sorted(unknown)[0]}: unknown keyword (storage, cache_dir, experiment)")
    return path_changes(**paths)


def leaderboard(spec: str | Path, *, budget: int | None = None, resume: bool = False,
                address: str | None = None, data_dir: str | Mapping[str, str] | None = None,
                replicates: int | None = None, **paths: str | None) -> LeaderboardOutcome:
    """``d3tune leaderboard``: every defense the spec names, tuned by its own robust search with
    the same budget on the same population; default and tuned settings confirmed on the same
    holdout seeds. ``data_dir`` and ``replicates`` as for ``robust`` (with K > 1 the outcome
    adds P(A > B) with its interval for D3 against each defense). Returns the
    ``LeaderboardOutcome``
    (``table``: one row per defense). Raises UsageError for bad input, before Ray starts."""
    from d3tune.search.leaderboard_driver import run_leaderboard
    from d3tune.specs.inputs import check_members
    from d3tune.specs.leaderboard_spec import load_leaderboard
    from d3tune.specs.robust_spec import replicate_specs

    loaded = load_leaderboard(spec, data_dirs(data_dir))
    if budget is not None:
        if resume:
            raise UsageError("--budget: a resumed leaderboard keeps the budget it started with")
        loaded = loaded.with_budget(budget)
    loaded = loaded.with_paths(**_path_changes(paths))
    if replicates is not None:
        loaded = loaded.with_replicates(replicates)
    for one in replicate_specs(loaded.searches[0]):  # the same population for every defense
        check_members(one)
    return run_leaderboard(loaded, resume=resume, address=address)


def report(run: str, out: str | Path | None = None) -> Path:
    """``d3tune report``: the report of a finished sweep or ablation (its MLflow parent run id,
    or its name), written to ``out`` and logged to the parent run; returns the folder."""
    from d3tune.reports.sweep_report import make_report

    return make_report(run, out)


def defaults(runs: Sequence[str], *, max_acc_drop: float = 0.02,
             out: str | Path = "d3tune_results/robust_defaults.yaml") -> tuple[Any, dict]:
    """``d3tune defaults``: the setting with the best worst-case DER over finished sweeps or
    ablations (MLflow parent run ids or experiment names) within ``max_acc_drop``, written to
    ``out`` as trial fields. Returns (the ``Defaults`` found, Optuna importance per run).
    Raises UsageError when a run is missing or no setting keeps the budget."""
    from d3tune.reports.sweep_report import find_defaults

    return find_defaults(list(runs), max_acc_drop, out)


def adopt(run: str, *, dataset: str | None = None, file: str | Path | None = None,
          force: bool = False) -> Any:
    """``d3tune adopt``: a finished robust search's chosen setting (of a replicated search, the
    replicate winner with the best search-phase worst case) becomes ``dataset``'s defaults,
    written to ``file`` (default: $D3TUNE_DEFAULTS_DIR or the package's defaults/). Returns
    the ``Adopted`` entry. Raises UsageError for a run that is not a finished robust search,
    or a replicated one whose spread exceeds its tolerance (unless ``force``)."""
    from d3tune.search.adoption import adopt as adopt_run

    return adopt_run(run, dataset=dataset, path=Path(file) if file else None, force=force)


def leave_one_attack_out(spec: str | Path, *, budget: int | None = None,
                         time_budget_s: float | None = None, resume: bool = False,
                         address: str | None = None,
                         data_dir: str | Mapping[str, str] | None = None,
                         **paths: str | None) -> pd.DataFrame:
    """``d3tune robust --leave-one-attack-out``: one robust search per attack family of the
    spec's population, searching on the others and confirming on it. Returns the summary
    table (one row per held-out family). Raises UsageError for bad input, before Ray
    starts."""
    from d3tune.search.robust_loo import load_leave_one_attack_out, run_leave_one_attack_out
    from d3tune.specs.inputs import check_members

    specs = [(family, adjusted_robust(one, budget, time_budget_s, resume, paths))
             for family, one in load_leave_one_attack_out(spec, data_dirs(data_dir))]
    if any(one.replicates > 1 for _, one in specs):
        raise UsageError("--replicates: --leave-one-attack-out runs one search per attack "
                         "family; replicated leave-one-attack-out searches are not supported")
    for _, one in specs:
        check_members(one)
    return run_leave_one_attack_out(specs, resume=resume, address=address)


def defense_citations(pattern: str = "*") -> dict[str, str | None]:
    """Registered defense -> the paper it implements (None when its entry names none)."""
    from d3tune.defenses import DEFENSES

    return {name: DEFENSES[name].citation for name in DEFENSES.names(pattern)}


def loaded_plugins() -> list[str]:
    """The plugin modules loaded into the registries (the ``d3tune.plugins`` entry-point group)."""
    from d3tune.plugins import ensure_plugins

    return list(ensure_plugins().loaded)


def list_attacks(pattern: str = "*") -> list[str]:
    """Registered attack names (plugins included), filtered by a wildcard such as "b*"."""
    from d3tune.attacks import ATTACKS

    return ATTACKS.names(pattern)


def list_defenses(pattern: str = "*") -> list[str]:
    """Registered defense names (plugins included), filtered by a wildcard."""
    from d3tune.defenses import DEFENSES

    return DEFENSES.names(pattern)


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names (plugins included), filtered by a wildcard."""
    from d3tune.models import MODELS

    return MODELS.names(pattern)


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names (plugins included), filtered by a wildcard."""
    from d3tune.data import DATASETS

    return DATASETS.names(pattern)
