"""Adopted defaults: ``d3tune adopt RUN`` turns a robust search's confirmed setting into the
defaults every trial config uses (every knob, with provenance); configs still win; ``paper``
and ``defaults: builtin`` skip the layer; bad input is one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from d3tune.cli import main
from d3tune.config import resolve, trial_config
from d3tune.errors import UsageError


def _robust_run(tmp_path: Path, chosen: dict | None, kind: str = "robust",
                datasets: str = "digits") -> tuple[str, str]:
    """A finished robust search's parent run as `d3tune robust` leaves it in MLflow."""
    from mlflow.tracking import MlflowClient

    from d3tune.yamlio import dump_yaml

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("robust", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp, tags={"d3tune.kind": kind, "d3tune.datasets": datasets,
                                       "d3tune.spec": "search_spaces/x.yaml",
                                       "d3tune.population_seeds": "0,1",
                                       "d3tune.holdout_seeds": "3,4"}).info.run_id
    client.log_param(run, "max_acc_drop", 0.03)
    if chosen is not None:
        for k, v in (("search_worst_der", 0.91), ("holdout_worst_der", 0.88),
                     ("holdout_mean_der", 0.95), ("holdout_mean_acc_drop", 0.021)):
            client.log_metric(run, k, v)
        path = tmp_path / "x.yaml"
        dump_yaml({"defense": chosen}, path)
        client.log_artifact(run, str(path), "defaults")
    client.set_terminated(run, "FINISHED")
    return run, uri


CHOSEN = {"name": "d3", "lr": 0.02, "epochs": 7, "eps": 0.2, "init": "near"}


def test_adopt_writes_every_knob_with_provenance(tmp_path, monkeypatch):
    from d3tune.search.adoption import adopt
    from d3tune.adopted_defaults import lookup, read

    monkeypatch.setenv("D3TUNE_DEFAULTS_DIR", str(tmp_path / "defaults"))
    run, uri = _robust_run(tmp_path, CHOSEN)
    entry = adopt(run, tracking_uri=uri)
    assert entry.path == tmp_path / "defaults" / "digits.yaml"
    knobs = read(entry.path)["d3"]["knobs"]
    # the chosen knobs, and every other one resolved for digits (profile, then built-in)
    assert knobs["lr"] == 0.02 and knobs["epochs"] == 7 and knobs["init"] == "near"
    assert knobs["batch_size"] == 32 and knobs["lmd"] == 0.5 and knobs["radius"] == 1.0
    prov = read(entry.path)["d3"]["provenance"]
    assert prov["robust_run"] == run and prov["holdout_worst_der"] == 0.88
    assert prov["spec"] == "search_spaces/x.yaml" and prov["holdout_seeds"] == "3,4"
    assert lookup("digits", "d3").knobs == knobs and lookup("digits", "ft") is None
    assert lookup("fashion_mnist", "d3") is None


def test_trial_configs_use_adopted_knobs_where_they_are_silent(tmp_path, monkeypatch):
    from d3tune.adopted_defaults import describe_for, write
    from d3tune.specs.robust_spec import Reference, robust_plan
    from d3tune.runner import adopted_params

    monkeypatch.setenv("D3TUNE_DEFAULTS_DIR", str(tmp_path))
    before = resolve(trial_config({}))
    assert before.defense.params.eps == 0.1 and before.defense.epochs == 40
    write(tmp_path / "digits.yaml", "digits", "d3", {"epochs": 7, "eps": 0.2, "lr": 0.02},
          {"robust_run": "abc", "adopted_on": "2026-12-05", "holdout_worst_der": 0.88})
    cfg = resolve(trial_config({}))
    assert (cfg.defense.epochs, cfg.defense.lr, cfg.defense.params.eps) == (7, 0.02, 0.2)
    assert cfg.defense.params.lmd == 0.5  # not adopted: built-in
    mine = resolve(trial_config({"defense": {"eps": 0.3}}))  # a knob the config names wins
    assert mine.defense.params.eps == 0.3 and mine.defense.epochs == 7
    raw = resolve(trial_config({"defaults": "builtin"}))
    assert raw.defense.params.eps == 0.1 and raw.defense.epochs == 40
    other = resolve(trial_config({"data": {"name": "synthetic"}}))  # another dataset: untouched
    assert other.defense.params.eps == 0.1
    ft = resolve(trial_config({"defense": {"name": "ft"}}))  # another defense: untouched
    assert ft.defense.epochs == 40
    assert "robust run abc" in describe_for("digits", "d3", "adopted")
    assert "adopted skipped" in describe_for("digits", "d3", "builtin")
    assert "none adopted" in describe_for("synthetic", "d3", "adopted")
    assert adopted_params(cfg)["defaults.robust_run"] == "abc"
    assert adopted_params(raw) == {"defaults.source": "builtin"}
    # a robust search's paper reference means the paper's knobs, never the adopted ones
    spec = robust_plan({"defense": "d3", "population": {"attacks": ["badnets"], "seeds": [0]},
                        "holdout_seeds": [1], "space": {"defense.lr": {"loguniform": [0.001,
                                                                                      0.1]}},
                        "references": ["paper", "profile"]}, "x.yaml")
    from d3tune.specs.robust_spec import member_config

    paper, profile = spec.references
    assert isinstance(paper, Reference) and paper.builtin and not profile.builtin
    assert member_config(spec, spec.holdout[0], {}, paper).defense.params.eps == 0.1
    assert member_config(spec, spec.holdout[0], {}, profile).defense.params.eps == 0.2


@pytest.mark.parametrize("content,needle", [
    ("d3: [1, 2]\n", "d3: expected {knobs"),
    ("- a\n", "expected a mapping of defense name"),
    ("d3: {knobs: {eps: -1}}\n", "(an adopted default, from"),
    ("d3: {knobs: {epz: 1}}\n", "did you mean 'eps'"),
])
def test_a_bad_adopted_file_is_one_line_naming_it(tmp_path, monkeypatch, content, needle):
    monkeypatch.setenv("D3TUNE_DEFAULTS_DIR", str(tmp_path))
    (tmp_path / "digits.yaml").write_text(content)
    with pytest.raises(UsageError) as info:
        trial_config({})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_adopt_refuses_what_it_cannot_adopt(tmp_path, monkeypatch):
    from d3tune.search.adoption import adopt

    monkeypatch.setenv("D3TUNE_DEFAULTS_DIR", str(tmp_path / "defaults"))
    sweep, uri = _robust_run(tmp_path / "a", CHOSEN, kind="sweep")
    with pytest.raises(UsageError, match="not a robust search"):
        adopt(sweep, tracking_uri=uri)
    nothing, uri = _robust_run(tmp_path / "b", None)
    with pytest.raises(UsageError, match="chose nothing"):
        adopt(nothing, tracking_uri=uri)
    two, uri = _robust_run(tmp_path / "c", CHOSEN, datasets="digits,synthetic")
    with pytest.raises(UsageError, match="--dataset"):
        adopt(two, tracking_uri=uri)
    with pytest.raises(UsageError, match="not in robust search"):
        adopt(two, dataset="cifar10", tracking_uri=uri)
    assert adopt(two, dataset="synthetic", tracking_uri=uri).dataset == "synthetic"
    with pytest.raises(UsageError, match="no MLflow run"):
        adopt("0" * 32, tracking_uri=uri)
    assert not (tmp_path / "defaults" / "digits.yaml").exists()


def test_adopt_from_the_command_line(tmp_path, monkeypatch, capsys):
    run, uri = _robust_run(tmp_path, CHOSEN)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "mine.yaml"
    assert main(["adopt", run, "--file", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["adopt", "f" * 32]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no MLflow run" in err


def test_shipped_digits_defaults_are_the_confirmed_robust_setting(monkeypatch):
    """What d3tune ships for D3 on digits: the setting every replicate of a replicated search
    chose, every knob, with its provenance (the procedure's interval within its tolerance), and
    what `d3tune run` resolves to when a config is silent."""
    from d3tune.adopted_defaults import PACKAGE_DIR, lookup

    monkeypatch.setenv("D3TUNE_SHIPPED_DEFAULTS", "1")
    monkeypatch.delenv("D3TUNE_DEFAULTS_DIR", raising=False)
    entry = lookup("digits", "d3")
    assert entry is not None and entry.path == PACKAGE_DIR / "digits.yaml"
    p = entry.provenance
    assert p["spec"].startswith("docs/results/leaderboard_digits_replicated/spec.yaml")
    assert p["replicated"] and p["holdout_seeds"] == [3, 4, 5] and len(p["replicates"]) == 3
    proc = p["procedure"]
    assert proc["holdout_spread"] <= proc["adopt_tolerance"] and not proc["forced"]
    assert proc["interval"][0] <= proc["expected_worst_der"] <= proc["interval"][1]
    assert "3 replicates: expected holdout worst DER 0.888 [0.874, 0.899]" in entry.describe()
    cfg = resolve(trial_config({}))
    assert cfg.defense.epochs == entry.knobs["epochs"] and cfg.defense.batch_size == 16
    assert cfg.defense.params.eps == pytest.approx(entry.knobs["eps"])
    assert cfg.defense.params.init == entry.knobs["init"]
    monkeypatch.setenv("D3TUNE_SHIPPED_DEFAULTS", "0")
    assert lookup("digits", "d3") is None
    assert resolve(trial_config({})).defense.epochs == 40  # the profile's again


def test_shipped_fashion_mnist_defaults_are_the_leaderboard_search_confirmed_setting(monkeypatch):
    """D3 on Fashion-MNIST ships the setting its budget-8 leaderboard search confirmed on the
    holdout within the 3-point ACC budget (the profile's schedule lost 7 points there)."""
    from d3tune.adopted_defaults import PACKAGE_DIR, lookup

    monkeypatch.setenv("D3TUNE_SHIPPED_DEFAULTS", "1")
    monkeypatch.delenv("D3TUNE_DEFAULTS_DIR", raising=False)
    entry = lookup("fashion_mnist", "d3")
    assert entry is not None and entry.path == PACKAGE_DIR / "fashion_mnist.yaml"
    p = entry.provenance
    assert p["spec"] == "search_spaces/leaderboard_fashion_mnist.yaml [d3]"
    assert p["holdout_mean_acc_drop"] <= p["max_acc_drop"] == 0.03
    cfg = resolve(trial_config({"data": {"name": "fashion_mnist"}}))
    assert (cfg.defense.epochs, cfg.defense.batch_size) == (49, 16)
    assert cfg.defense.params.p == 1.5 and cfg.defense.params.init == "near"
    assert lookup("digits", "d3").knobs != entry.knobs  # one file per dataset
