"""A robust search and a leaderboard over BackdoorBench records, end to end on a real local Ray:
two records in CIFAR-10 layout whose backdoors plant (BadNets and Blended on a PreActResNet-18),
found by their recorded data path or by ``--data-dir``; members, exact pruning, confirmation on
holdout seeds and MLflow read-back behave as they do on digits."""
from __future__ import annotations

import logging
import textwrap

import pytest
from bb_records import digits_as_cifar, write_planted_record

pytestmark = pytest.mark.slow  # ~3 min to write the records, ~4 min of searches (2 cores)

SPEC = """
name: records
defense: d3
base:
  defense: {epochs: 2, batch_size: 16}
population:
  records: [bb/record/badnet/attack_result.pt, bb/record/blended/attack_result.pt]
  seeds: [0, 1]
holdout_seeds: [2, 3]
budget: 3
top_k: 1
max_acc_drop: 0.7   # 2 epochs of D3 on 40 clean images keep no realistic budget: the test is
                    # about the machinery (members, pruning, holdout, MLflow), not D3's figures
space:
  defense.lr: {loguniform: [0.003, 0.03]}
  defense.eps: {uniform: [0.0, 0.3]}
storage: tune
cache_dir: cache
"""


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    """A BackdoorBench-like folder: two planted records, the clean data where they say."""
    root = tmp_path_factory.mktemp("records")
    cifar = digits_as_cifar(root / "bb" / "data" / "cifar10", train_size=800)
    for name, attack in (("badnet", {"name": "badnets", "patch": 6}),
                         ("blended", {"name": "blended"})):
        write_planted_record(root / "bb" / "record" / name, cifar, attack, epochs=6)
    return root


def _runs(tmp_path, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_robust_search_on_records(bb, local_ray, tmp_path, monkeypatch, caplog):
    from d3tune import api

    monkeypatch.chdir(bb)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (bb / "robust.yaml").write_text(textwrap.dedent(SPEC) + "experiment: records-robust\n")
    with caplog.at_level(logging.WARNING, logger="d3tune.specs.records"):
        outcome = api.robust("robust.yaml", out=tmp_path / "chosen.yaml",
                             storage=str(tmp_path / "tune"))
    assert any("using " + str(bb / "bb" / "data" / "cifar10") in r.getMessage()
               for r in caplog.records)  # the recorded ./data/cifar10, found and said

    # every backdoor planted, so no member is left out
    pop = outcome.population.set_index("member")
    assert set(pop.index) >= {"bb-badnet_s0", "bb-badnet_s1", "bb-blended_s0", "bb-blended_s1"}
    assert not pop["excluded"].any() and (pop["asr_before"] >= 0.9).all(), pop

    search = outcome.search
    assert len(search) == 3 and not search["error"].any()
    done = search[search["complete"]]
    admissible = done[done["mean_acc_drop"] <= outcome.spec.max_acc_drop]
    for _, row in search[search["pruned"]].iterrows():  # exact: a pruned setting could not win
        assert row["worst_der"] < admissible["worst_der"].max()
        assert row["members_done"] < row["members_total"] == 4
    for _, row in done.iterrows():
        assert set(row["ders"]) == {"bb-badnet_s0", "bb-badnet_s1", "bb-blended_s0",
                                    "bb-blended_s1"}
        assert row["worst_der"] == pytest.approx(min(row["ders"].values()))

    finalist = outcome.holdout[outcome.holdout["kind"] == "finalist"]
    assert len(finalist) == 1  # top_k 1, confirmed on the holdout seeds only

    runs = _runs(tmp_path, "records-robust")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["d3tune.kind"] == "robust"
    for r in children:
        phase = r.data.tags["d3tune.phase"]
        ids = {k.split(".", 1)[1] for k in r.data.metrics if k.startswith("der.")}
        seeds = {"search": {"0", "1"}, "holdout": {"2", "3"}}[phase]
        assert {i.rsplit("_s", 1)[1] for i in ids} <= seeds, (phase, ids)
        assert r.data.params["seeds"] == {"search": "0,1", "holdout": "2,3"}[phase]
    assert outcome.chosen is not None
    assert (tmp_path / "chosen.yaml").read_text().startswith("defense:")


def test_leaderboard_on_records_with_data_dir(bb, local_ray, tmp_path, monkeypatch):
    from d3tune.cli import main

    from d3tune.yamlio import dump_yaml, parse_yaml

    monkeypatch.chdir(tmp_path)  # the recorded ./data/cifar10 is nowhere here: --data-dir is
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = parse_yaml(textwrap.dedent(SPEC), "spec")
    space = data.pop("space")
    data.pop("defense")
    data["population"]["records"] = [str(bb / r) for r in data["population"]["records"]]
    data.update(name="records-lb", defenses=["d3", "ft"], budget=2, experiment="records-lb",
                spaces={"d3": space, "ft": {"defense.lr": space["defense.lr"]}})
    dump_yaml(data, tmp_path / "lb.yaml")
    assert main(["leaderboard", "lb.yaml", "--data-dir", str(bb / "bb" / "data" / "cifar10")]) == 0

    runs = _runs(tmp_path, "records-lb")
    kinds = [r.data.tags.get("d3tune.kind") for r in runs if "mlflow.parentRunId" not in
             r.data.tags]
    assert kinds.count("leaderboard") == 1
    robust = [r for r in runs if r.data.tags.get("d3tune.kind") == "robust"]
    assert sorted(r.data.tags["d3tune.defense"] for r in robust) == ["d3", "ft"]
    holdout = [r for r in runs if r.data.tags.get("d3tune.phase") == "holdout"]
    labels = [r.data.tags["d3tune.label"] for r in holdout]
    assert len(holdout) >= 2 and labels.count("ref-default") == 2, labels
    for r in holdout:  # every defense confirms on the same holdout members
        assert {k for k in r.data.metrics if k.startswith("der.")} == {
            "der.bb-badnet_s2", "der.bb-badnet_s3", "der.bb-blended_s2", "der.bb-blended_s3"}
