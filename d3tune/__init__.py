"""d3tune: the D3 backdoor defense, baselines, and a Ray Tune / Optuna / MLflow sweep engine.

From Python (docs/python.md; the input contract is in ``d3tune.api``)::

    import d3tune
    defended = d3tune.defend(model, clean_x, clean_y, defense="d3", seed=0, epochs=20)
    d3tune.evaluate(defended, test_x, test_y, bd_x, bd_target, bd_true)  # {'acc', 'asr', 'ra'}
    d3tune.run_trial({"data": {"name": "digits"}, "attack": {"name": "badnets"}})
    d3tune.sweep("search_spaces/d3_default.yaml"); d3tune.ablate("ablations/quickstart.yaml")
    d3tune.run({"attack": {"name": "blended"}, "defense": {"name": "d3"}})  # as `d3tune run`
    d3tune.robust("search_spaces/robust_d3_digits.yaml")  # .chosen: the confirmed setting
    d3tune.robust("search_spaces/robust_d3_digits.yaml", replicates=3)  # .procedure: interval
    d3tune.leaderboard("search_spaces/leaderboard_digits.yaml")
    d3tune.report("quickstart-ablations")  # a finished sweep's or ablation's report
    d3tune.defaults(["quickstart-ablations"]); d3tune.adopt(RUN_ID)
    d3tune.leave_one_attack_out("search_spaces/robust_d3_digits.yaml")
    d3tune.list_attacks(), d3tune.list_defenses(), d3tune.list_models(), d3tune.list_datasets()

The verbs are imported on first use, so ``import d3tune`` itself loads neither torch nor Ray.
Third-party attacks, defenses, models and datasets plug in through the entry-point group
``d3tune.plugins`` (docs/plugins.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from d3tune import plugins as _plugins
from d3tune import registry as _registry

# The first registry lookup in a process loads the installed plugins (d3tune/plugins.py).
_registry.set_lookup_hook(_plugins.ensure_plugins)

__all__ = ["defend", "evaluate", "run_trial", "run", "trial_fields", "sweep", "ablate", "robust",
           "leaderboard", "report", "defaults", "adopt", "leave_one_attack_out",
           "list_attacks", "list_defenses", "list_models", "list_datasets", "defense_citations",
           "loaded_plugins"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports lazily
    from d3tune.api import (  # noqa: F401
        ablate,
        adopt,
        defaults,
        defend,
        defense_citations,
        evaluate,
        leaderboard,
        leave_one_attack_out,
        list_attacks,
        list_datasets,
        list_defenses,
        list_models,
        loaded_plugins,
        report,
        robust,
        run,
        run_trial,
        sweep,
        trial_fields,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from d3tune import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'd3tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
