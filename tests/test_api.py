"""The Python API (d3tune.defend/evaluate/run_trial/list_*) and plugins through entry points.

The plugin used here is the one docs/plugins.md shows, built from that page: its module, and a
dist-info folder whose entry_points.txt comes from the page's pyproject.toml (what `pip install`
leaves), put on PYTHONPATH so importlib.metadata finds it in subprocesses and Ray workers alike.
"""
from __future__ import annotations

import ast
import importlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import d3tune
from d3tune.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(markdown: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", markdown, re.S)


def write_dist(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(
        "[d3tune.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """docs/plugins.md's package, installed as a folder for PYTHONPATH."""
    page = (ROOT / "docs" / "plugins.md").read_text()
    project = tomllib.loads(code_blocks(page, "toml")[0])["project"]
    site = tmp_path_factory.mktemp("site")
    (site / "d3tune_checker.py").write_text(code_blocks(page, "python")[0])
    write_dist(site, project["name"], project["version"],
               project["entry-points"]["d3tune.plugins"])
    return site


def plugin_env(tmp: Path, *sites: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    env["D3TUNE_CACHE_DIR"] = str(tmp / "cache")
    env["COLUMNS"] = "200"  # rich wraps log lines at the terminal width (80 when piped)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same CPU numerics as this process
    return env


def d3tune_cli(args: list[str], tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d3tune", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)


class TinyNet(nn.Module):
    """A model d3tune knows nothing about (standardised float input, plain module names)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------------------------------------
# The API itself


def test_import_d3tune_loads_neither_torch_nor_ray(tmp_path):
    code = ("import sys, d3tune; print('torch' in sys.modules, 'ray' in sys.modules); "
            "print(callable(d3tune.list_models))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env=plugin_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "True"]


def test_list_verbs_read_the_registries():
    assert "badnets" in d3tune.list_attacks() and d3tune.list_attacks("bad*") == ["badnets"]
    assert "d3" in d3tune.list_defenses() and "cnn" in d3tune.list_models()
    assert "digits" in d3tune.list_datasets()


def test_robust_leaderboard_and_report_stay_verbs_after_their_modules_load():
    """They were blocked while d3tune.robust etc. were modules: importing the module would have
    replaced the verb on the package. The packages per role free the names for good."""
    import d3tune.reports.sweep_report  # noqa: F401
    import d3tune.search.leaderboard_driver  # noqa: F401
    import d3tune.search.robust_driver  # noqa: F401

    for name in ("robust", "leaderboard", "report", "sweep", "ablate"):
        verb = getattr(d3tune, name)
        assert callable(verb) and verb.__module__ == "d3tune.api", name


def test_robust_and_leaderboard_verbs_refuse_bad_options_before_ray(monkeypatch):
    """One validation path for the CLI and the API: the same one-line errors, nothing started."""
    import d3tune.search.tuner

    def boom(*args, **kwargs):
        raise AssertionError("Ray was about to start")

    monkeypatch.setattr(d3tune.search.tuner, "init_ray", boom)
    robust = ROOT / "search_spaces" / "robust_d3_digits.yaml"
    board = ROOT / "search_spaces" / "leaderboard_digits.yaml"
    with pytest.raises(UsageError, match="^--budget: a resumed search keeps"):
        d3tune.robust(robust, budget=3, resume=True)
    with pytest.raises(UsageError, match="^--time-budget-s: expected a number of seconds > 0"):
        d3tune.robust(robust, time_budget_s=0)
    with pytest.raises(UsageError, match="^--storage 's3://b': URIs are not supported"):
        d3tune.leaderboard(board, storage="s3://b")
    with pytest.raises(UsageError, match="^bogus: unknown keyword"):
        d3tune.leaderboard(board, bogus="x")
    with pytest.raises(UsageError, match="^--budget: a resumed leaderboard keeps"):
        d3tune.leaderboard(board, budget=2, resume=True)


def test_readme_example_runs_as_written(capsys):
    page = (ROOT / "docs" / "python.md").read_text()
    code = code_blocks(page, "python")[0]
    assert "torchvision.models.resnet18" in code and "d3tune.defend(" in code
    scope = {"__name__": "readme_example"}
    exec(compile(code, "docs/python.md", "exec"), scope)
    lines = [ln.partition(" {") for ln in capsys.readouterr().out.splitlines()]
    assert [name for name, _, _ in lines] == ["backdoored", "after D3"]
    before, after = (ast.literal_eval("{" + rest) for _, _, rest in lines)
    for metrics in (before, after):
        assert set(metrics) == {"acc", "asr", "ra"} and all(0 <= v <= 1 for v in metrics.values())
    # D3 did something: its head left the poisoned weights and the outputs moved (this tiny
    # model's predictions may not: it is 2 epochs on 256 images, as the README says)
    model, defended = scope["model"].eval(), scope["defended"]
    assert not torch.allclose(model.fc.weight, defended.fc.weight)
    probe = scope["data"].x_test[:16].float() / 255
    with torch.no_grad():
        assert not torch.allclose(model(probe), defended(probe))


@pytest.fixture
def digits_small():
    from d3tune.data import load_dataset

    d = load_dataset("digits")
    return d, d.x_train[:40], d.y_train[:40]


# anp: 8 mask steps barely move a mask, so a threshold of 1 prunes what moved at all
CHEAP = {"anp": {"nb_iter": 8, "threshold": 1.0}, "nad": {"te_epochs": 1}, "ibau": {"n_rounds": 1, "k": 1}}


@pytest.mark.parametrize("defense", d3tune.list_defenses())
def test_every_defense_runs_on_a_foreign_model(defense, digits_small, caplog):
    data, x, y = digits_small
    torch.manual_seed(0)
    model = TinyNet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="d3tune.api"):
        out = d3tune.defend(model, x, y, defense, seed=0, device="cpu",
                            normalize=(data.mean, data.std), epochs=1, batch_size=20,
                            **CHEAP.get(defense, {}))
    assert isinstance(out, TinyNet) and out is not model and not out.training
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # a copy
    assert list(out.state_dict()) == list(original)  # same module names: no wrapper left
    changed = [k for k, v in out.state_dict().items()
               if v.is_floating_point() and not torch.equal(v.cpu(), original[k])]
    assert changed, f"{defense} returned the model's own weights"
    if defense in ("d3", "fp", "fst"):  # the head defaults to the last Linear, said by name
        assert any("'fc'" in r.getMessage() for r in caplog.records)
    m = d3tune.evaluate(out, data.x_test[:50], data.y_test[:50], data.x_test[50:80], 0,
                        data.y_test[50:80], normalize=(data.mean, data.std))
    assert set(m) == {"acc", "asr", "ra"} and all(0.0 <= v <= 1.0 for v in m.values())


def test_defend_fails_in_one_line_naming_what_to_fix(digits_small):
    data, x, y = digits_small
    no_linear = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UsageError, match="select_layer"):
        d3tune.defend(no_linear, x, y, "d3", device="cpu", epochs=1)
    named = d3tune.defend(no_linear, x, y, "d3", device="cpu", epochs=1, select_layer="0")
    assert not torch.equal(named[0].weight, no_linear[0].weight)  # the named layer was trained
    with pytest.raises(UsageError, match=r"clean_x: float pixels must lie in \[0, 1\].*normalize"):
        d3tune.defend(TinyNet(), (x.float() - 128) / 64, y, device="cpu", epochs=1)
    with pytest.raises(UsageError, match="defense.epsilon: unknown field.*did you mean 'eps'"):
        d3tune.defend(TinyNet(), x, y, device="cpu", epsilon=0.1)
    with pytest.raises(UsageError, match="defense: unknown defense 'd4'; choose one of: anp, d3,"):
        d3tune.defend(TinyNet(), x, y, "d4", device="cpu")


def test_defend_on_a_d3tune_model_uses_its_registered_head(digits_small, caplog):
    from d3tune.models import ModelSpec, build_model

    data, x, y = digits_small
    model = build_model("cnn", ModelSpec(10, 1, 16, data.mean, data.std))
    with caplog.at_level(logging.INFO, logger="d3tune.api"):
        d3tune.defend(model, x[:8], y[:8], device="cpu", epochs=1, batch_size=8)
    assert any("'linear' (the head registered for 'cnn')" in r.getMessage()
               for r in caplog.records)


def test_run_trial_takes_nested_or_dotted_fields(tiny_digits):
    result = d3tune.run_trial({"attack.name": "badnets", "train": {"epochs": 1},
                               "defense.epochs": 2, "eval.subset": 50},
                              use_cache=False, data=tiny_digits)
    assert {"acc_before", "asr_after", "der"} <= set(result.metrics)
    assert [row["epoch"] for row in result.history] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Plugins: discovery, failures


@pytest.fixture
def registries_restored():
    from d3tune.plugins import builtin_registries

    regs = builtin_registries()
    saved = [dict(r._items) for r in regs]
    yield
    for r, items in zip(regs, saved):
        r._items = items


def fake_ep(name: str, obj) -> SimpleNamespace:
    def load():
        if isinstance(obj, Exception):
            raise obj
        return obj
    return SimpleNamespace(name=name, value=f"fake_{name}:register", load=load)


def test_a_failing_plugin_is_undone_reported_once_and_skipped(registries_restored, caplog):
    from d3tune.attacks import ATTACKS, register as register_attack
    from d3tune.defenses import DEFENSES, register as register_defense
    from d3tune.plugins import PluginState, load_plugins

    builtin_badnets = ATTACKS["badnets"]

    def half_done():  # registers one thing, then raises
        register_defense("half_done")(lambda *a: None)
        raise RuntimeError("boom\nsecond line")

    def good():
        register_defense("plugged")(lambda *a: None)

    def taken_name():
        register_attack("badnets")(lambda ctx: None)

    eps = [fake_ep("half", half_done), fake_ep("good", good), fake_ep("dup", taken_name),
           fake_ep("noimport", ImportError("no module named 'x'")), fake_ep("number", 42)]
    with caplog.at_level(logging.WARNING, logger="d3tune.plugins"):
        state = load_plugins(eps, PluginState())
    assert state.loaded == ["good"]
    assert sorted(n for n, _ in state.skipped) == ["dup", "half", "noimport", "number"]
    assert "plugged" in DEFENSES and "half_done" not in DEFENSES
    assert ATTACKS["badnets"] is builtin_badnets
    warnings = [r.getMessage() for r in caplog.records if r.name == "d3tune.plugins"]
    assert len(warnings) == 4 and all("\n" not in w and "skipped" in w for w in warnings)
    assert any("'half'" in w and "RuntimeError: boom second line" in w for w in warnings)


def test_a_plugin_raising_on_import_leaves_list_working(plugin_site, tmp_path):
    broken = tmp_path / "broken_site"
    broken.mkdir()
    (broken / "d3tune_broken.py").write_text("raise ImportError('needs a package that is gone')\n")
    write_dist(broken, "d3tune-broken", "0.1", {"broken": "d3tune_broken:register"})
    proc = d3tune_cli(["list"], tmp_path, plugin_env(tmp_path, broken, plugin_site))
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert "Traceback" not in proc.stdout + proc.stderr
    mentions = [ln for ln in lines if "broken" in ln]
    assert len(mentions) == 1 and "skipped" in mentions[0] and "gone" in mentions[0]
    assert any(ln.startswith("attacks:") and "checker" in ln for ln in lines)
    assert any(ln.startswith("models:") and "tinynet" in ln for ln in lines)
    assert "plugins: checker" in lines


# ---------------------------------------------------------------------------------------------
# Plugins in runs and sweeps; defend() against the CLI path


@pytest.fixture(scope="module")
def checker_run(plugin_site, tmp_path_factory):
    """`d3tune run` with the plugin's attack and model, in a fresh process."""
    tmp = tmp_path_factory.mktemp("run")
    proc = d3tune_cli(["run", "--dataset", "digits", "--attack", "checker", "--arch", "tinynet",
                       "--seed", "1", "--set", "attack.size=3", "--set", "train.epochs=3",
                       "--epochs", "3", "--set", "data.clean_count=60", "--set",
                       "eval.subset=60", "--no-mlflow", "--out", str(tmp / "runs"),
                       "--cache-dir", str(tmp / "cache")], tmp, plugin_env(tmp, plugin_site))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = next((tmp / "runs").iterdir())
    return tmp, out, json.loads((out / "result.json").read_text())


def test_cli_run_with_the_plugins_attack_and_model(checker_run):
    _, out, record = checker_run
    cfg = record["config"]
    assert (cfg["attack"]["name"], cfg["attack"]["size"], cfg["model"]["arch"]) == \
        ("checker", 3, "tinynet")
    assert 0.0 <= record["metrics"]["asr_before"] <= 1.0
    epochs = [row["epoch"] for row in record["history"]]  # as the evaluation schedule chose
    assert epochs[0] == 1 and epochs[-1] == 3 and epochs == sorted(set(epochs))
    assert (out / "defended.safetensors").exists()


def test_defend_gives_the_weights_the_cli_run_gave(checker_run, plugin_site, monkeypatch,
                                                   caplog):
    """Same backdoored weights (the run's cache entry), same clean subset and seed: defend() on
    the plugin's bare network (no Normalize inside, so d3tune adapts its input) must give the
    CLI run's defended weights bit for bit."""
    from safetensors.torch import load_file

    from d3tune.attacks import split_state
    from d3tune.cache import ModelCache
    from d3tune.config import resolve, trial_config
    from d3tune.data import load_dataset
    from d3tune.trial import clean_subset

    tmp, out, record = checker_run
    cfg = record["config"]
    monkeypatch.syspath_prepend(str(plugin_site))
    plugin = importlib.import_module("d3tune_checker")  # imported, not registered here
    data = load_dataset("digits")
    weights, _ = split_state(ModelCache(tmp / "cache").load(record["cache_key"]).tensors)
    net = plugin.TinyNet(data.shape[0], data.num_classes)
    net.load_state_dict({k[len("net."):]: v for k, v in weights.items() if k.startswith("net.")})
    backdoored = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = clean_subset(resolve(trial_config({"data": cfg["data"], "seed": cfg["seed"]})), data)
    knobs = {k: v for k, v in cfg["defense"].items() if k != "name"}
    with caplog.at_level(logging.INFO, logger="d3tune.api"):
        defended = d3tune.defend(net, x, y, "d3", seed=cfg["seed"], device="cpu",
                                 normalize=(data.mean, data.std), hflip=data.hflip, **knobs)
    assert any("'fc'" in r.getMessage() for r in caplog.records)  # = the plugin's head net.fc
    cli = load_file(str(out / "defended.safetensors"))
    ours = defended.state_dict()
    assert sorted(f"net.{k}" for k in ours) == sorted(k for k in cli if k.startswith("net."))
    for k, v in ours.items():
        assert torch.equal(v, cli[f"net.{k}"]), k
    assert not torch.equal(ours["fc.weight"], backdoored["fc.weight"])  # D3 did change it


@pytest.mark.slow  # Ray startup + two trials in a fresh process: 242 s wall at load ~35 on 2 cores
def test_two_trial_sweep_with_the_plugin_in_ray_workers(plugin_site, tmp_path):
    spec = tmp_path / "plugsweep.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: plugsweep
        storage: {tmp_path / 'tune'}
        cache_dir: {tmp_path / 'cache'}
        experiment: plugin
        max_concurrent: 2
        num_samples: 2
        scheduler: {{name: none}}
        base:
          data: {{name: digits}}
          attack: {{name: checker, size: 3}}
          model: {{arch: tinynet}}
          train: {{epochs: 2}}
          defense: {{name: d3, epochs: 2}}
          eval: {{subset: 50}}
        space:
          defense.lr: {{loguniform: [0.005, 0.05]}}
        """))
    env = plugin_env(tmp_path, plugin_site)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = d3tune_cli(["sweep", str(spec)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    trials = [p for p in (tmp_path / "tune" / "plugsweep").iterdir() if p.is_dir()]
    assert len(trials) == 2
    for t in trials:  # each worker found the plugin: no error, every epoch reported
        assert not list(t.glob("error*")), (t / "error.txt").read_text()[-2000:]
        rows = [json.loads(ln) for ln in (t / "result.json").read_text().splitlines() if ln]
        assert [r["epoch"] for r in rows] == [1, 2]
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        children = con.execute("select count(*) from tags where key='mlflow.parentRunId'")
        assert children.fetchone()[0] == 2
        statuses = [r[0] for r in con.execute("select status from runs")]
    assert statuses == ["FINISHED"] * 3
