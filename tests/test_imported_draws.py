"""A defense's replicated draws imported from an earlier leaderboard (``imported_draws``): the
file is refused unless its protocol is this spec's, its models are this run's (cache key and
weights), and one of its holdout member evaluations reproduces under this code; once taken,
it pairs with this run's defenses exactly as if it had run here."""
from __future__ import annotations

import copy
import json
import textwrap

import pytest

from d3tune.errors import UsageError
from d3tune.specs.draws_file import FORMAT, KIND, protocol
from d3tune.specs.leaderboard_spec import leaderboard_plan
from d3tune.yamlio import parse_yaml

SPEC = """
name: lb
defenses: [ft]
population: {attacks: [blended], seeds: [0]}
holdout_seeds: [5, 6]
budget: 2
replicates: 2
top_k: 1
"""


def plan(extra: dict | None = None, text: str = SPEC):
    data = parse_yaml(textwrap.dedent(text), "lb.yaml")
    data.update(extra or {})
    return leaderboard_plan(data, "lb.yaml")


def summary(r: int, worsts: list[float]) -> dict:
    draws = {"trial-0": [{"seed": 5 + i, "worst_der": w, "mean_der": w, "mean_acc_drop": 0.01,
                          "members": 1} for i, w in enumerate(worsts)]}
    return {"replicate": r, "chosen": "trial-0", "setting": {"defense.lr": 0.01},
            "params": {"defense.lr": 0.01}, "search_seed": r, "population_seeds": [1000 * r],
            "search_worst_der": 0.8, "holdout_admissible": True, "draws": draws,
            "holdout_worst_der": {"trial-0": min(worsts)}, "search_cpu_s": 5.0,
            "holdout_cpu_s": {"trial-0": 1.0}}


def draws_payload(defense: str = "d3", **changes) -> dict:
    """A draws file as a finished leaderboard writes it, for ``defense`` under SPEC's
    protocol (the spec with that defense run instead of imported)."""
    other = plan(text=SPEC.replace("defenses: [ft]", f"defenses: [{defense}]"))
    payload = {"format": FORMAT, "kind": KIND, "defense": defense,
               "protocol": protocol(other.searches[0]),
               "summaries": [summary(0, [0.9, 0.8]), summary(1, [0.85, 0.95])],
               "models": {"blended_s5": {"cache_key": "k5", "sha256": "a" * 64}},
               "spot": [{"replicate": 0, "row": "trial-0", "member": "blended_s5",
                         "reference": None, "params": {"defense.lr": 0.01}, "der": 0.9,
                         "acc_after": 0.95, "asr_after": 0.05}],
               "provenance": {"git_commit": "abc"}}
    payload.update(changes)
    return payload


def write(tmp_path, payload: dict, name: str = "draws_d3.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return str(path)


def test_a_matching_file_joins_the_pairs(tmp_path):
    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload())}})
    (imp,) = spec.imported
    assert imp.defense == "d3" and len(imp.summaries) == 2 and spec.defenses == ("ft",)
    assert spec.pairs == (("d3", "ft"),)  # D3 leads, imported or not
    assert imp.spec.defense == "d3" and imp.spec.replicates == 2


@pytest.mark.parametrize("change, needle", [
    ({"budget": 3}, r"another protocol \(budget differ"),
    ({"holdout_seeds": [5, 7]}, r"another protocol \(holdout differ"),
    ({"resources": {"cpu": 2}}, r"another protocol \(threads differ"),
    ({"base": {"train": {"epochs": 3}}}, r"another protocol \(base differ"),
])
def test_another_protocol_is_refused_naming_the_fields(tmp_path, change, needle):
    path = write(tmp_path, draws_payload())
    with pytest.raises(UsageError, match=r"lb.yaml: imported_draws.d3: .*" + needle):
        plan({"imported_draws": {"d3": path}, **change})


def test_bad_files_name_the_field(tmp_path):
    cases = [
        (str(tmp_path / "absent.json"), "no such file"),
        (write(tmp_path, {}, "x.json"), "not a d3tune draws file"),
        (write(tmp_path, draws_payload(format=99), "f.json"), "has format 99"),
        (write(tmp_path, draws_payload(summaries=[summary(0, [0.9, 0.8])]), "s.json"),
         "does not hold 2 replicates' summaries"),
        (write(tmp_path, draws_payload(defense="fst"), "o.json"), "holds 'fst''s draws"),
    ]
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((str(tmp_path / "bad.json"), "is not readable JSON"))
    for path, needle in cases:
        with pytest.raises(UsageError, match="imported_draws.d3: ") as err:
            plan({"imported_draws": {"d3": path}})
        assert needle in str(err.value), (needle, str(err.value))


def test_importing_a_defense_this_run_searches_is_refused(tmp_path):
    path = write(tmp_path, draws_payload())
    with pytest.raises(UsageError, match="imported_draws.d3: 'd3' is also in `defenses`"):
        plan({"imported_draws": {"d3": path}, "defenses": ["ft", "d3"]})
    with pytest.raises(UsageError, match="imported_draws.nope: unknown defense"):
        plan({"imported_draws": {"nope": path}})
    with pytest.raises(UsageError, match=r"imported_draws.d3: draws pair only in a replicated"):
        plan({"imported_draws": {"d3": path}, "replicates": 1})


def test_models_must_be_the_same_keys_and_weights():
    from d3tune.search.imported_draws import check_models
    from d3tune.specs.draws_file import ImportedDraws

    theirs = {"a_s5": {"cache_key": "k1", "sha256": "1" * 64},
              "a_s6": {"cache_key": "k2", "sha256": "2" * 64},
              "a_s1000": {"cache_key": "k3", "sha256": "3" * 64}}
    imp = ImportedDraws("d3", "draws_d3.json", [], theirs)
    ours = {k: dict(v) for k, v in theirs.items() if k != "a_s1000"}  # not built here yet
    assert check_models(imp, ours, "where") == 2
    ours["a_s6"]["sha256"] = "f" * 64  # same key, other weights: another machine's build
    with pytest.raises(UsageError, match=r"where: the backdoored models of a_s6 differ"):
        check_models(imp, ours, "where")
    ours["a_s6"] = {"cache_key": "other", "sha256": "2" * 64}
    with pytest.raises(UsageError, match="a_s6 differ"):
        check_models(imp, ours, "where")


def test_fingerprints_read_the_cache_record(tmp_path):
    import torch

    from d3tune.cache import Entry, ModelCache
    from d3tune.search.imported_draws import fingerprints, recorded_models

    cache = ModelCache(tmp_path / "cache")
    cache.store("key1", Entry({"w": torch.ones(3)}, {}))
    (tmp_path / "population.json").write_text(json.dumps({
        "a_s5": {"cache_key": "key1"}, "a_s6": {"cache_key": "absent"}}))
    keys = recorded_models([tmp_path / "population.json", tmp_path / "none.json"])
    assert keys == {"a_s5": "key1", "a_s6": "absent"}
    got = fingerprints(keys, str(tmp_path / "cache"))
    assert set(got) == {"a_s5"} and got["a_s5"]["cache_key"] == "key1"
    assert got["a_s5"]["sha256"] == cache.checksum("key1") and len(got["a_s5"]["sha256"]) == 64
    other = ModelCache(tmp_path / "cache2")
    other.store("key1", Entry({"w": torch.zeros(3)}, {}))
    assert other.checksum("key1") != cache.checksum("key1")


def test_the_report_pairs_imported_draws_and_says_where_they_came_from(tmp_path):
    from d3tune.reports.leaderboard_report import import_lines
    from d3tune.reports.replicate_report import replicated_leaderboard

    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload())}})
    (imp,) = spec.imported
    ft = copy.deepcopy(imp.summaries)
    for s in ft:
        for d in s["draws"]["trial-0"]:
            d["worst_der"] -= 0.3
    state = {"defenses": {
        "ft": {"done": True, "replicates": ft},
        "d3": {"done": True, "imported": imp.path, "replicates": imp.summaries,
               "models_checked": 7, "git_commit": "abcdef1234567",
               "spot_check": {"replicate": 0, "row": "trial-0", "member": "blended_s5",
                              "der": 0.9}}}}
    board = replicated_leaderboard(spec, state, ["ft", "d3"], tmp_path)
    (cmp,) = board.comparisons
    assert (cmp.a, cmp.b, cmp.n, cmp.p) == ("d3", "ft", 4, 1.0)
    text = "\n".join(import_lines(spec, state))
    assert f"d3: draws imported from `{imp.path}` (run at commit abcdef1234)" in text
    assert "The 7 backdoored models" in text and "gave DER 0.9000" in text


def test_export_writes_what_load_accepts(tmp_path, monkeypatch):
    """A finished run's state folders -> draws file -> accepted by the next spec."""
    from d3tune.cache import Entry, ModelCache
    from d3tune.search import imported_draws
    from d3tune.search.robust_driver import HOLDOUT_FILE, POPULATION_FILE
    from d3tune.specs.robust_spec import replicate_specs

    import torch

    monkeypatch.chdir(tmp_path)
    ran = plan({"defenses": ["d3"], "cache_dir": "cache"})
    search = ran.searches[0]
    cache = ModelCache("cache")
    cache.store("k5", Entry({"w": torch.ones(2)}, {}))
    sums = [summary(0, [0.9, 0.8]), summary(1, [0.85, 0.95])]
    for rspec in replicate_specs(search):
        rspec.paths.state_dir.mkdir(parents=True)
        (rspec.paths.state_dir / HOLDOUT_FILE).write_text(json.dumps({"trial-0": [
            {"member": "blended_s6", "seed": 6, "der": 0.8, "acc_after": 0.9,
             "asr_after": 0.1}]}))
    ran.state_dir.mkdir(parents=True)
    (ran.state_dir / POPULATION_FILE).write_text(json.dumps({"blended_s5": {"cache_key": "k5"}}))
    path = imported_draws.export(search, sums, [ran.state_dir / POPULATION_FILE], tmp_path)
    assert path.name == "draws_d3.json"
    data = json.loads(path.read_text())
    assert data["models"] == {"blended_s5": {"cache_key": "k5", "sha256": cache.checksum("k5")}}
    assert data["spot"][0] == {"replicate": 0, "row": "trial-0", "member": "blended_s6",
                               "reference": None, "params": {"defense.lr": 0.01}, "der": 0.8,
                               "acc_after": 0.9, "asr_after": 0.1}
    assert data["provenance"]["threads"] == 1
    spec = plan({"imported_draws": {"d3": str(path)}, "cache_dir": "cache"})
    assert spec.imported[0].summaries == sums


@pytest.mark.slow  # ~4 min on 2 cores: a replicated two-defense leaderboard, then its split
def test_a_split_leaderboard_answers_as_the_whole_one(local_ray, tmp_path, monkeypatch, capsys):
    """FT and FST in one run, then FST alone with FT's draws imported from the first run's
    report: the same P(FT > FST), the same procedure; a tampered file is refused (exit 2)."""
    from d3tune import api
    from d3tune.cli import main
    from d3tune.yamlio import dump_yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = {"name": "whole", "population": {"attacks": ["blended"], "seeds": [0]},
            "holdout_seeds": [1, 2], "defenses": ["ft", "fst"], "budget": 1, "top_k": 1,
            "max_acc_drop": 0.9, "base": {"train": {"epochs": 3}, "defense": {"epochs": 2}},
            "spaces": {"ft": {"defense.lr": {"loguniform": [0.005, 0.05]}},
                       "fst": {"defense.alpha": {"uniform": [0.05, 0.5]}}},
            "compare": [["ft", "fst"]],
            "replicates": 2, "max_concurrent": 2, "storage": "tune", "cache_dir": "cache"}
    dump_yaml(spec, tmp_path / "whole.yaml")
    whole = api.leaderboard("whole.yaml")
    draws = whole.out_dir / "draws_ft.json"
    assert draws.exists() and (whole.out_dir / "draws_fst.json").exists()

    dump_yaml({**spec, "name": "part", "defenses": ["fst"], "storage": "tune2",
               "imported_draws": {"ft": str(draws)}}, tmp_path / "part.yaml")
    part = api.leaderboard("part.yaml")

    def answer(outcome):
        (c,) = [c for c in outcome.comparisons if (c.a, c.b) == ("ft", "fst")]
        return c.p, c.low, c.high, c.n

    assert answer(part) == answer(whole) and answer(part)[3] == 4
    for key in (("ft", "tuned"), ("fst", "tuned"), ("fst", "default")):
        assert part.procedures[key].expected_worst_der == whole.procedures[key].expected_worst_der
    text = (part.out_dir / "leaderboard.md").read_text()
    assert f"ft: draws imported from `{draws}`" in text and "re-run here, gave DER" in text
    assert not (part.out_dir / "draws_ft.json").exists()  # only what this run searched

    for name, tamper, needle in (
            ("spot", lambda d: d["spot"][0].update(der=d["spot"][0]["der"] + 0.01),
             "gives other figures"),
            ("models", lambda d: next(iter(d["models"].values())).update(sha256="0" * 64),
             "differ from the ones")):
        bad = json.loads(draws.read_text())
        tamper(bad)
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
        dump_yaml({**spec, "name": name, "defenses": ["fst"], "storage": f"tune-{name}",
                   "imported_draws": {"ft": f"{name}.json"}}, tmp_path / f"{name}.yaml")
        capsys.readouterr()
        assert main(["leaderboard", f"{name}.yaml"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "imported_draws.ft: " in err and needle in err, err
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("d3tune-leaderboard")
    boards = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("d3tune.kind") == "leaderboard"]
    status = {r.info.run_name: r.info.status for r in boards}
    assert status == {"whole": "FINISHED", "part": "FINISHED", "spot": "FAILED",
                      "models": "FAILED"}, status  # a refused import leaves nothing RUNNING


def test_command_line_changes_are_checked_against_the_import_too(tmp_path):
    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload())}})
    with pytest.raises(UsageError, match=r"--budget: imported_draws.d3: .*\(budget differ"):
        spec.with_budget(4)
    with pytest.raises(UsageError, match=r"--replicates: imported_draws.d3: .*\(replicates"):
        spec.with_replicates(3)
    assert spec.with_budget(2).imported[0].spec.budget == 2
    moved = spec.with_paths(cache_dir=str(tmp_path / "elsewhere"))
    assert moved.imported[0].spec.cache_dir == str(tmp_path / "elsewhere")  # the re-run's cache
