"""Every trial field a ``d3tune run`` flag sets can be set by every kind of spec (sweep, ablation,
robust, leaderboard), or the spec refuses it on purpose, for a reason written here.

Why: robust searches and leaderboards once had no way to name a dataset folder, so every dataset
read from a folder, and every BackdoorBench record of one, was out of their reach, while
``d3tune run --data-dir`` worked. A new ``run`` flag now fails this test until each spec kind
either carries its field to the trials or refuses it with a reason.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_backdoorbench import bb_state_dict, make_record

from d3tune.cli import RUN_FLAG_FIELDS, build_parser
from d3tune.config import flatten, resolve, to_dict, trial_config, unflatten
from d3tune.errors import UsageError
from d3tune.specs.leaderboard_spec import leaderboard_plan
from d3tune.specs.robust_spec import member_config, robust_plan
from d3tune.specs.sweep_spec import ablation_plan, sweep_plan

# `d3tune run` options that set no single trial field of their own, and where each spec kind
# takes the same thing instead.
OTHER_RUN_OPTIONS = {
    "config": "a YAML file of trial fields: a spec's base",
    "set": "any trial field: a spec's base (or population / space)",
    "attack_result": "attack.result (checked below), with the record's dataset and arch",
    "eval_full": "eval.every = 1 and eval.subset = 0 (checked below)",
    "threads": "torch's CPU threads: every spec kind runs a trial at resources.cpu (below)",
    "out": "where result.json goes: a spec's storage",
    "cache_dir": "the model cache: a spec's cache_dir or --cache-dir",
    "no_cache": "always train: specs share the cache on purpose (one model, many defenses)",
    "experiment": "the MLflow experiment: a spec's experiment or --experiment",
    "no_mlflow": "specs always log to MLflow (a parent run and its children)",
}
FIELDS = {**{field: field for field in RUN_FLAG_FIELDS.values()},
          "attack.result": "attack.result", "eval.every": "eval.every",
          "eval.subset": "eval.subset"}

# A valid value for each field that differs from its default, so "set" is visible.
VALUES: dict[str, Any] = {
    "data.name": "synthetic", "data.data_dir": "DATA", "data.clean_ratio": 0.2,
    "data.train_size": 100, "attack.name": "blended", "defense.name": "ft",
    "model.arch": "preactresnet18", "seed": 5, "defense.epochs": 3, "defense.lr": 0.02,
    "device": "cpu", "attack.result": "RECORD", "eval.every": 1, "eval.subset": 0,
}

# (spec kind, field) -> why that kind refuses it. Nothing else may be refused.
REFUSED = {
    ("robust", "eval.every"): "a robust search scores each member once, after its last epoch",
    ("robust", "eval.subset"): "a robust search scores each member once, on the full test sets",
    ("leaderboard", "eval.every"): "as robust: members are scored once, after their last epoch",
    ("leaderboard", "eval.subset"): "as robust: members are scored on the full test sets",
}

SPACE = {"defense.batch_size": {"choice": [16, 32]}}  # a knob every defense has


def _base_setter(kind: str) -> Callable[[str, Any], dict[str, Any]]:
    def spec(field: str, value: Any) -> dict[str, Any]:
        base = {field: value}
        if field == "attack.result":
            base.update({"attack.name": "backdoorbench", "data.name": "cifar10",
                         "data.data_dir": "DATA"})
        data: dict[str, Any] = {"name": "t", "base": unflatten(base)}
        if kind == "sweep":
            data["space"] = SPACE
        else:
            data["axes"] = {"defense.batch_size": [16]}
        return data
    return spec


def _population_fragment(field: str, value: Any) -> dict[str, Any]:
    """The population (and top-level) fields of a robust spec that set ``field``."""
    pop: dict[str, Any] = {"attacks": ["badnets"], "seeds": [0]}
    top: dict[str, Any] = {}
    if field == "data.name":
        pop["datasets"] = [value]
    elif field in ("data.data_dir", "data.train_size"):
        pop["datasets"] = [{"name": "digits", field.split(".")[1]: value}]
    elif field == "data.clean_ratio":
        pop["clean_ratios"] = [value]
    elif field == "attack.name":
        pop["attacks"] = [value]
    elif field == "attack.result":
        pop = {"records": [value], "datasets": [{"name": "cifar10", "data_dir": "DATA"}],
               "seeds": [0]}
    elif field == "model.arch":
        pop["archs"] = [value]
    elif field == "seed":
        pop["seeds"] = [value]
    elif field == "defense.name":
        top["defense"] = value
    else:
        top["base"] = unflatten({field: value})
    return {"population": pop, **top}


def robust_spec(field: str, value: Any) -> dict[str, Any]:
    return {"name": "t", "holdout_seeds": [9], "space": SPACE, **_population_fragment(field,
                                                                                        value)}


def leaderboard_spec(field: str, value: Any) -> dict[str, Any]:
    data = _population_fragment(field, value)
    if "defense" in data:
        data["defenses"] = [data.pop("defense")]
    defenses = data.pop("defenses", ["d3"])
    return {"name": "t", "holdout_seeds": [9], "defenses": defenses,
            "spaces": {d: SPACE for d in defenses}, "start_with_default": False, **data}


def first_trial(kind: str, data: dict[str, Any]):
    """The resolved config of the first trial the spec would run."""
    if kind == "sweep":
        plan = sweep_plan(data, "t.yaml")
        return resolve(trial_config(plan.base))
    if kind == "ablation":
        plan = ablation_plan(data, "t.yaml")
        return resolve(trial_config(unflatten({**flatten(plan.base), **plan.cells[0]})))
    if kind == "robust":
        spec = robust_plan(data, "t.yaml")
        return member_config(spec, spec.members[0], {})
    spec = leaderboard_plan(data, "t.yaml").searches[0]
    return member_config(spec, spec.members[0], {})


SETTERS = {"sweep": _base_setter("sweep"), "ablation": _base_setter("ablation"),
           "robust": robust_spec, "leaderboard": leaderboard_spec}


def test_every_run_option_is_a_field_or_explained():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run._actions if a.dest != "help"}
    unexplained = dests - set(RUN_FLAG_FIELDS) - set(OTHER_RUN_OPTIONS)
    assert not unexplained, f"`d3tune run` options with no field and no reason here: {unexplained}"
    assert not set(OTHER_RUN_OPTIONS) - dests, "a listed option no longer exists"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from test_real_datasets import write_cifar

    root = tmp_path_factory.mktemp("inputs")
    record, _ = make_record(root / "rec", size=32, n=3, state=bb_state_dict())
    write_cifar(root / "cifar", n=3)
    return {"RECORD": str(record), "DATA": str(root / "cifar")}


@pytest.mark.parametrize("kind", list(SETTERS))
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_spec_sets_the_field_or_refuses_it_on_purpose(kind, field, inputs):
    value = VALUES[field]
    value = inputs.get(value, value) if isinstance(value, str) else value
    data = _fill(SETTERS[kind](field, value), inputs)
    if (kind, field) in REFUSED:
        with pytest.raises(UsageError):
            first_trial(kind, data)
        return
    try:
        cfg = first_trial(kind, data)
    except UsageError as exc:
        pytest.fail(f"a {kind} spec cannot set {field} ({exc}); make it settable, or refuse it "
                    "on purpose and say why in REFUSED")
    got = flatten(to_dict(cfg))[field]
    assert got == value, f"a {kind} spec set {field} = {value!r}, its trial runs with {got!r}"


def test_threads_have_a_spec_field_everywhere():
    """``run --threads N`` pins torch's threads; every spec kind runs its trials at
    ``resources.cpu`` threads, so that is where a spec sets them."""
    resources = {"resources": {"cpu": 2}}
    assert sweep_plan({**_base_setter("sweep")("seed", 1), **resources}, "t").resources.cpu == 2
    assert robust_plan({**robust_spec("seed", 1), **resources}, "t").resources.cpu == 2
    assert leaderboard_plan({**leaderboard_spec("seed", 1), **resources},
                            "t").searches[0].resources.cpu == 2


def _fill(data: Any, inputs: dict[str, str]) -> Any:
    if isinstance(data, dict):
        return {k: _fill(v, inputs) for k, v in data.items()}
    if isinstance(data, list):
        return [_fill(v, inputs) for v in data]
    return inputs.get(data, data) if isinstance(data, str) else data


def test_a_base_seed_beside_a_seed_axis_is_refused():
    data = {**_base_setter("ablation")("seed", 5), "seeds": [0, 1]}
    with pytest.raises(UsageError, match=r"^t.yaml: base.seed: the seeds are set by `seeds`"):
        ablation_plan(data, "t.yaml")
