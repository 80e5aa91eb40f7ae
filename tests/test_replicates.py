"""Replicated robust searches and leaderboards: replicates in specs, the procedure's figures
from replicate summaries, P(A > B) between defenses, and adopting from a replicated search
(refused beyond the tolerance unless forced)."""
from __future__ import annotations

import json
import textwrap

import pytest

from d3tune.errors import UsageError
from d3tune.reports.replicate_report import adoption_pick, draw_table, procedure, setting_spread
from d3tune.specs.robust_spec import REPLICATE_SEED_STRIDE, replicate_specs, robust_plan
from d3tune.yamlio import parse_yaml

SPEC = """
name: rep
defense: d3
base: {defense: {epochs: 2}}
population: {attacks: [blended, badnets], seeds: [0, 1]}
holdout_seeds: [5, 6, 7]
budget: 2
space: {defense.lr: {loguniform: [0.005, 0.05]}}
search_seed: 3
"""


def plan(text: str = SPEC, **extra):
    data = parse_yaml(textwrap.dedent(text), "rep.yaml")
    data.update(extra)
    return robust_plan(data, "rep.yaml")


def test_each_replicate_has_its_own_seeds_and_the_same_holdout():
    spec = plan(replicates=3)
    reps = replicate_specs(spec)
    assert [r.name for r in reps] == ["rep-r0", "rep-r1", "rep-r2"]
    assert [r.search_seed for r in reps] == [3, 4, 5]
    assert [sorted({m.seed for m in r.members}) for r in reps] == [
        [0, 1], [1000, 1001], [2000, 2001]]
    assert [m.id for m in reps[1].members] == ["blended_s1000", "blended_s1001",
                                               "badnets_s1000", "badnets_s1001"]
    assert all(r.holdout == spec.holdout for r in reps)
    assert all(dict(m.overrides)["seed"] == m.seed for r in reps for m in r.members)
    assert replicate_specs(plan()) == [plan()]  # one replicate: the spec itself, its own name


@pytest.mark.parametrize("extra, needle", [
    ({"replicates": 0}, "rep.yaml: replicates: expected an integer >= 1, got 0"),
    ({"replicates": 2, "holdout_seeds": [5]}, "2 replicates need at least 2 holdout seeds"),
    ({"replicates": 2, "holdout_seeds": [5, 1001]}, "holdout seed(s) [1001] are also seeds of "
                                                    "a replicate's population"),
    ({"replicates": 2, "population": {"attacks": ["blended"], "seeds": [0, 1000]}},
     "population seeds must be below 1000"),
    ({"adopt_tolerance": 1.5}, "adopt_tolerance: expected a fraction"),
])
def test_bad_replicates_name_the_field(extra, needle):
    with pytest.raises(UsageError) as err:
        plan(**extra)
    assert needle in str(err.value), str(err.value)


def test_cli_replicates_out_of_range_is_one_line_exit_2(tmp_path, capsys):
    from d3tune.cli import main

    spec = tmp_path / "rep.yaml"
    spec.write_text(textwrap.dedent(SPEC).replace("[5, 6, 7]", "[5]"))
    for k, needle in (("0", "--replicates: expected an integer >= 1, got 0"),
                      ("2", "--replicates: 2 replicates need at least 2 holdout seeds")):
        assert main(["robust", str(spec), "--replicates", k, "--storage", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [spec]  # refused before anything ran


def test_leaderboard_replicates_and_pairs():
    from d3tune.specs.leaderboard_spec import leaderboard_plan

    data = parse_yaml(textwrap.dedent("""
        name: lb
        defenses: [ft, d3, fst]
        population: {attacks: [blended], seeds: [0]}
        holdout_seeds: [5, 6]
        budget: 1
        replicates: 2
        compare: [[fst, ft]]
        """), "lb.yaml")
    spec = leaderboard_plan(data, "lb.yaml")
    assert spec.replicates == 2 and all(s.replicates == 2 for s in spec.searches)
    assert spec.pairs == (("d3", "ft"), ("d3", "fst"), ("fst", "ft"))
    data["compare"] = [["d3", "sau"]]
    with pytest.raises(UsageError, match=r"compare\[0\]: expected \[A, B\], two defenses"):
        leaderboard_plan(data, "lb.yaml")


# --- the procedure's figures from replicate summaries ----------------------------------------


def summary(r: int, worsts: list[float], setting: dict, search_worst: float,
            default: list[float] | None = None) -> dict:
    draws = {"trial-1": [{"seed": 5 + i, "worst_der": w, "mean_der": w + 0.05,
                          "mean_acc_drop": 0.01, "members": 2} for i, w in enumerate(worsts)]}
    if default is not None:
        draws["ref-default"] = [{"seed": 5 + i, "worst_der": w, "mean_der": w,
                                 "mean_acc_drop": 0.0, "members": 2}
                                for i, w in enumerate(default)]
    return {"replicate": r, "chosen": "trial-1", "setting": setting, "search_seed": r,
            "population_seeds": [r * REPLICATE_SEED_STRIDE], "search_worst_der": search_worst,
            "holdout_admissible": True, "draws": draws,
            "holdout_worst_der": {k: min(d["worst_der"] for d in v) for k, v in draws.items()},
            "search_cpu_s": 10.0, "holdout_cpu_s": {k: 2.0 for k in draws}}


def test_a_replicate_that_kept_no_setting_counts_the_default_not_nothing():
    """A search that kept no setting within the ACC budget delivers the defense's default:
    its draws are the default's, so the procedure is not judged on its successes alone."""
    from d3tune.reports.replicate_report import compare_defenses, delivered_row

    failed = summary(2, [0.0, 0.0, 0.0], {}, 0.0, default=[0.5, 0.4, 0.45])
    failed.update(chosen=None, setting=None, search_worst_der=None)
    failed["draws"].pop("trial-1")
    sums = [summary(r, [0.9, 0.8, 0.85], {"defense.lr": 0.01}, 0.88, default=[0.5, 0.4, 0.45])
            for r in (0, 1)] + [failed]
    assert delivered_row(failed) == "ref-default"
    table = draw_table(sums)
    assert len(table) == 9 and list(table["row"])[-3:] == ["ref-default"] * 3
    assert procedure(sums).expected_worst_der == pytest.approx((2 * 2.55 + 1.35) / 9)
    other = [summary(r, [0.6, 0.6, 0.6], {}, 0.6) for r in range(3)]
    pair = compare_defenses({"a": sums, "b": other}, [("a", "b")])[0]
    assert pair.n == 9  # every replicate paired, the failed one included
    nothing = dict(failed, draws={})
    assert delivered_row(nothing) is None and len(draw_table([nothing])) == 0


def test_procedure_over_replicates_and_holdout_seeds():
    sums = [summary(0, [0.90, 0.80, 0.85], {"defense.lr": 0.01, "defense.p": 1}, 0.88),
            summary(1, [0.70, 0.75, 0.72], {"defense.lr": 0.03, "defense.p": 1}, 0.91),
            summary(2, [0.88, 0.86, 0.90], {"defense.lr": 0.02, "defense.p": 2}, 0.85)]
    table = draw_table(sums)
    assert len(table) == 9 and list(table["replicate"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    proc = procedure(sums)
    assert proc.draws == 9 and proc.replicates == 3
    assert proc.expected_worst_der == pytest.approx(sum(table["worst_der"]) / 9)
    assert proc.low < proc.expected_worst_der < proc.high
    assert proc.holdout_spread == pytest.approx(0.86 - 0.70)  # per replicate: min over seeds
    assert proc.settings == {"defense.lr": "0.01..0.03", "defense.p": "1..2"}
    assert proc.search_cpu_s == 30.0 and proc.holdout_cpu_s == 6.0
    # adoption: the best search-phase worst case (replicate 1), not the best holdout figure
    assert adoption_pick(sums)["replicate"] == 1
    assert setting_spread([{"a": "x"}, {"a": "x"}]) == {"a": "= x"}


def test_synthetic_leaderboard_verdicts():
    """A beats B by construction on every paired draw: 'A ahead'; two identical defenses:
    'not separable'."""
    from d3tune.reports.replicate_report import compare_defenses

    worse = [[0.6, 0.62, 0.58], [0.61, 0.57, 0.6], [0.63, 0.6, 0.59]]
    sums = {"d3": [summary(r, [w + 0.2 for w in ws], {}, 0.9) for r, ws in enumerate(worse)],
            "ft": [summary(r, ws, {}, 0.9) for r, ws in enumerate(worse)],
            "ft_copy": [summary(r, ws, {}, 0.9) for r, ws in enumerate(worse)]}
    (d3_ft, copies) = compare_defenses(sums, [("d3", "ft"), ("ft", "ft_copy")])
    assert (d3_ft.p, d3_ft.n, d3_ft.verdict) == (1.0, 9, "d3 ahead")
    assert (copies.p, copies.verdict) == (0.5, "not separable")


def test_replicated_leaderboard_section(tmp_path):
    from types import SimpleNamespace

    from d3tune.reports.replicate_report import replicated_leaderboard

    sums = {d: [summary(r, [base + 0.01 * r, base, base + 0.02], {}, 0.9, default=[0.5] * 3)
                for r in range(3)] for d, base in (("d3", 0.9), ("ft", 0.7))}
    state = {"defenses": {d: {"done": True, "replicates": s} for d, s in sums.items()}}
    spec = SimpleNamespace(replicates=3, pairs=(("d3", "ft"),),
                           searches=[SimpleNamespace(holdout=[SimpleNamespace(seed=s)
                                                              for s in (5, 6, 7)])])
    board = replicated_leaderboard(spec, state, ["d3", "ft"], tmp_path)
    assert set(board.procedures) == {("d3", "tuned"), ("d3", "default"), ("ft", "tuned"),
                                     ("ft", "default")}
    assert board.comparisons[0].verdict == "d3 ahead"
    assert board.metrics["p_ahead.d3_vs_ft"] == 1.0
    text = "\n".join(board.lines)
    assert "| d3 | ft | 1.000 | 1.000..1.000 | 9 | d3 ahead |" in text
    assert "95 % percentile bootstrap" in text
    assert (tmp_path / "pairs.csv").read_text().startswith("a,b,p_a_ahead,low,high")
    assert len((tmp_path / "replicated_draws.csv").read_text().splitlines()) == 1 + 4 * 9
    from PIL import Image

    with Image.open(tmp_path / "replicated.png") as img:  # the draws' plot, linked from the text
        assert img.size[0] > 400 and "![replicated draws](replicated.png)" in text


# --- adopting from a replicated search --------------------------------------------------------


def replicated_run(tmp_path, spread: float) -> str:
    """A finished replicated search's parent run, as ``run_replicated`` leaves it."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("rep", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp, tags={"d3tune.kind": "robust-replicated",
                                       "d3tune.datasets": "digits", "d3tune.adopt_replicate": "1",
                                       "d3tune.interval": "95 % percentile bootstrap"})
    rid = run.info.run_id
    metrics = {"holdout_spread": spread, "expected_worst_der": 0.81,
               "expected_worst_der_low": 0.77, "expected_worst_der_high": 0.85, "draws": 9,
               "adopt.search_worst_der": 0.9, "adopt.holdout_worst_der": 0.8}
    client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param("adopt_tolerance", "0.05"), Param("max_acc_drop", "0.03")])
    (tmp_path / "d.yaml").write_text("defense: {name: d3, lr: 0.02, eps: 0.2}\n")
    client.log_artifact(rid, str(tmp_path / "d.yaml"), "defaults")
    (tmp_path / "provenance.json").write_text(json.dumps({
        "threads": 1, "split_test": True, "budget": 8, "top_k": 1,
        "replicates": [{"replicate": 0, "search_seed": 0, "population_seeds": [0]}],
        "holdout_seeds": [5, 6, 7], "git_commit": "abc", "torch_version": "2.14.1"}))
    client.log_artifact(rid, str(tmp_path / "provenance.json"), "replicates")
    client.set_terminated(rid, "FINISHED")
    return rid


def test_adopt_refuses_a_spread_beyond_the_tolerance_unless_forced(tmp_path, monkeypatch,
                                                                    capsys):
    from d3tune.adopted_defaults import read
    from d3tune.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rid = replicated_run(tmp_path, spread=0.08)
    target = tmp_path / "digits.yaml"
    assert main(["adopt", rid, "--file", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "spread by 0.080, more than adopt_tolerance 0.050" in err and "--force" in err, err
    assert len(err.splitlines()) == 1 and not target.exists()
    assert main(["adopt", rid, "--file", str(target), "--force"]) == 0
    out = capsys.readouterr().out
    assert "the procedure (expected over 9 draws): 0.810 [0.770, 0.850]" in out, out
    entry = read(target)["d3"]
    assert entry["knobs"]["lr"] == 0.02 and entry["knobs"]["eps"] == 0.2
    prov = entry["provenance"]
    assert prov["procedure"]["forced"] is True and prov["adopted_replicate"] == 1
    assert prov["holdout_seeds"] == [5, 6, 7] and prov["threads"] == 1
    assert prov["git_commit"] == "abc" and prov["torch_version"] == "2.14.1"


def test_adopt_within_the_tolerance(tmp_path, monkeypatch):
    from d3tune.search.adoption import adopt

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    entry = adopt(replicated_run(tmp_path, spread=0.03), path=tmp_path / "digits.yaml")
    assert entry.dataset == "digits" and entry.provenance["procedure"]["forced"] is False


# --- end to end on a real local Ray -----------------------------------------------------------

TINY = {"name": "tiny", "defense": "d3",
        "base": {"train": {"epochs": 3}, "defense": {"epochs": 2}},
        "population": {"attacks": ["blended"], "seeds": [0]}, "holdout_seeds": [1, 2],
        "budget": 2, "top_k": 1, "max_acc_drop": 0.9, "max_concurrent": 2,
        "space": {"defense.lr": {"loguniform": [0.005, 0.05]}},
        "references": [{"name": "gentle", "setting": {"defense.lr": 0.001}}]}


@pytest.mark.slow  # ~2 min on 2 cores: two whole searches and their holdout
def test_replicated_robust_search_end_to_end(local_ray, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from d3tune import api
    from d3tune.yamlio import dump_yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dump_yaml({**TINY, "storage": "tune", "cache_dir": "cache", "experiment": "rep"},
              tmp_path / "tiny.yaml")
    outcome = api.robust("tiny.yaml", replicates=2, out=tmp_path / "chosen.yaml")

    assert [s["replicate"] for s in outcome.summaries] == [0, 1]
    assert [s["population_seeds"] for s in outcome.summaries] == [[0], [1000]]
    assert [s["search_seed"] for s in outcome.summaries] == [0, 1]
    for s in outcome.summaries:  # every replicate confirmed on the same two holdout seeds
        assert [d["seed"] for d in s["draws"][s["chosen"]]] == [1, 2]
        assert [d["seed"] for d in s["draws"]["ref-gentle"]] == [1, 2]
        assert s["search_cpu_s"] > 0 and s["holdout_cpu_s"][s["chosen"]] > 0
    proc = outcome.procedure
    assert proc.draws == 4 and proc.low <= proc.expected_worst_der <= proc.high
    # the reference row is the same setting on the same holdout models in both replicates
    gentle = [d["worst_der"] for s in outcome.summaries for d in s["draws"]["ref-gentle"]]
    assert gentle[:2] == gentle[2:]
    rows = (tmp_path / "tune" / "tiny.d3tune" / "replicates.csv").read_text().splitlines()
    assert rows[0] == "replicate,row,seed,worst_der,mean_der,mean_acc_drop,members"
    assert len(rows) == 1 + 4 + 4  # chosen and ref-gentle, 2 replicates x 2 seeds each
    assert (tmp_path / "chosen.yaml").read_text().startswith("defense:")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rep")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parent = next(r for r in runs if r.data.tags.get("d3tune.kind") == "robust-replicated")
    assert parent.info.status == "FINISHED" and parent.data.params["replicates"] == "2"
    assert parent.data.params["runtime.threads"] == "1"
    assert parent.data.metrics["draws"] == 4
    robust = [r for r in runs if r.data.tags.get("d3tune.kind") == "robust"]
    assert sorted(r.data.tags["d3tune.replicate"] for r in robust) == ["0", "1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in robust)
    assert all(r.data.params["runtime.threads"] == "1" for r in runs
               if r.data.tags.get("d3tune.phase") in ("search", "holdout"))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "replicates")}
    assert artifacts == {"replicates/replicates.csv", "replicates/replicates.md",
                         "replicates/provenance.json"}

    # the same command again needs --resume; resuming a finished one re-runs nothing
    with pytest.raises(UsageError, match="--resume"):
        api.robust("tiny.yaml", replicates=2)
    again = api.robust("tiny.yaml", replicates=2, resume=True)
    assert again.procedure.expected_worst_der == proc.expected_worst_der
    assert len(client.search_runs([exp.experiment_id], max_results=500)) == len(runs)


@pytest.mark.slow  # ~3 min on 2 cores: two defenses x two replicated searches
def test_replicated_leaderboard_end_to_end(local_ray, tmp_path, monkeypatch):
    from d3tune import api
    from d3tune.yamlio import dump_yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = {"name": "lb", "population": {"attacks": ["blended"], "seeds": [0]},
            "holdout_seeds": [1, 2], "defenses": ["ft", "fst"], "budget": 1, "top_k": 1,
            "max_acc_drop": 0.9, "base": {"train": {"epochs": 3}, "defense": {"epochs": 2}},
            "spaces": {"ft": {"defense.lr": {"loguniform": [0.005, 0.05]}},
                       "fst": {"defense.alpha": {"uniform": [0.05, 0.5]}}},
            "replicates": 2, "max_concurrent": 2, "storage": "tune", "cache_dir": "cache"}
    dump_yaml(spec, tmp_path / "lb.yaml")
    outcome = api.leaderboard("lb.yaml")
    assert set(outcome.procedures) == {("ft", "tuned"), ("ft", "default"), ("fst", "tuned"),
                                       ("fst", "default")}
    assert all(p.draws == 4 for p in outcome.procedures.values())
    (cmp,) = outcome.comparisons  # no d3 here: the first defense against the others
    assert (cmp.a, cmp.b, cmp.n) == ("ft", "fst", 4)
    assert cmp.verdict in ("ft ahead", "fst ahead", "not separable")
    assert len(outcome.table) == 2  # the classic table: each defense's replicate 0
    text = (outcome.out_dir / "leaderboard.md").read_text()
    assert "## Replicated: how sure the answer is" in text and "| ft | fst |" in text
    assert (outcome.out_dir / "pairs.csv").exists()
