"""``backdoorbench``: a backdoored model that BackdoorBench trained, read from its attack_result.pt.

Why an attack entry: a trial then runs any defense on BackdoorBench's own checkpoints (the models
the D3 paper's numbers come from) through the same code, specs and MLflow logging as d3tune's
attacks: ``d3tune run --attack-result PATH`` or ``attack: {name: backdoorbench, result: PATH}``,
and an ablation axis over ``attack.result`` compares defenses across several records. The file
is loaded safely (d3tune.backdoorbench); ratio/target/mode are the record's and are ignored here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from d3tune.attacks import AttackContext, ImportedBackdoor, Trigger, register
from d3tune.errors import UsageError

NAME = "backdoorbench"


@dataclass(frozen=True)
class Params:
    result: str | None = None  # path of BackdoorBench's attack_result.pt (bd_test_dataset/ beside it)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(params: Params) -> ImportedBackdoor:
    from d3tune.backdoorbench import load_attack_result

    if not params.result:
        raise UsageError(f"attack.result: attack {NAME!r} needs the path of a BackdoorBench "
                         "attack_result.pt (d3tune run --attack-result PATH)")
    r = load_attack_result(params.result)
    return ImportedBackdoor(
        source=str(r.path), key=f"{NAME}-{file_digest(r.path)[:24]}", state_dict=r.state_dict,
        arch=r.arch, dataset=r.dataset, data_hint=f"{r.clean_data} (read from {r.data_path!r})",
        num_classes=r.num_classes, image_shape=r.image_shape, mean=r.mean, std=r.std,
        x_bd_test=r.x_bd_test, y_bd_target=r.y_bd_target, y_bd_true=r.y_bd_true)


@register(NAME, Params, load_backdoor=load)
def make(ctx: AttackContext) -> Trigger:
    raise UsageError(f"attack.name: {NAME!r} brings its own trained model and poisoned test set; "
                     "its trigger cannot be applied to other images")
