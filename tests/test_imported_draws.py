"""A defense's replicated draws imported from an earlier leaderboard (``imported_draws``): the
file is refused unless its protocol is this run's (after the command line's overrides), its
models are this run's (cache key and weights, every member), and one of its holdout member
evaluations reproduces under this code; once taken, it pairs with this run's defenses exactly
as if it had run here, and a resumed leaderboard re-takes an import the spec changed."""
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
            "holdout_cpu_s": {"trial-0": 1.0}, "git_commit": f"c{r}" + "0" * 12}


MODELS = {m: {"cache_key": f"k-{m}", "sha256": m[-1] * 64}
          for m in ("blended_s0", "blended_s1000", "blended_s5", "blended_s6")}


def draws_payload(defense: str = "d3", extra: dict | None = None, **changes) -> dict:
    """A draws file as a finished leaderboard writes it, for ``defense`` under SPEC's
    protocol (with ``extra`` spec fields: the spec it ran under)."""
    other = plan({**(extra or {}), "defenses": [defense]})
    payload = {"format": FORMAT, "kind": KIND, "defense": defense,
               "protocol": protocol(other.searches[0]),
               "summaries": [summary(0, [0.9, 0.8]), summary(1, [0.85, 0.95])],
               "models": copy.deepcopy(MODELS),
               "spot": [{"replicate": 0, "row": "trial-0", "member": "blended_s5",
                         "reference": None, "params": {"defense.lr": 0.01}, "member_batch": 1,
                         "der": 0.9, "acc_after": 0.95, "asr_after": 0.05}],
               "provenance": {"git_commit": "abc"}}
    payload.update(changes)
    return payload


def write(tmp_path, payload: dict, name: str = "draws_d3.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return str(path)


def test_a_matching_file_joins_the_pairs(tmp_path):
    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload())}})
    spec.check_imports()
    (imp,) = spec.imported
    assert imp.defense == "d3" and len(imp.summaries) == 2 and spec.defenses == ("ft",)
    assert spec.pairs == (("d3", "ft"),)  # D3 leads, imported or not
    assert imp.spec.defense == "d3" and imp.spec.replicates == 2 and len(imp.sha256) == 64


@pytest.mark.parametrize("change, needle", [
    ({"budget": 3}, r"another protocol \(budget differ"),
    ({"holdout_seeds": [5, 7]}, r"another protocol \(holdout differ"),
    ({"resources": {"cpu": 2}}, r"another protocol \(threads differ"),
    ({"max_concurrent": 4}, r"another protocol \(max_concurrent differ"),
    ({"base": {"train": {"epochs": 3}}}, r"another protocol \(base differ"),
])
def test_another_protocol_is_refused_naming_the_fields(tmp_path, change, needle):
    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload())}, **change})
    with pytest.raises(UsageError, match=r"lb.yaml: imported_draws.d3: .*" + needle):
        spec.check_imports()


def test_where_a_dataset_or_record_sits_is_not_protocol(tmp_path):
    from d3tune.specs.draws_file import _no_paths

    fields = {"data": {"name": "cifar10", "data_dir": "/mnt/a"},
              "attack": {"name": "bb", "params": {"result": "/mnt/a/r.pt", "ratio": 0.1}},
              "data.data_dir": "/x", "attack.params.result": "/y", "seed": 1}
    assert _no_paths(fields) == {"data": {"name": "cifar10"},
                                 "attack": {"name": "bb", "params": {"ratio": 0.1}}, "seed": 1}


def test_bad_files_name_the_field(tmp_path):
    cases = [
        (str(tmp_path / "absent.json"), "no such file"),
        (write(tmp_path, {}, "x.json"), "not a d3tune draws file"),
        (write(tmp_path, draws_payload(format=99), "f.json"), "has format 99"),
        (write(tmp_path, draws_payload(summaries=[]), "s.json"), "lacks its summaries"),
        (write(tmp_path, draws_payload(defense="fst"), "o.json"), "holds 'fst''s draws"),
    ]
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((str(tmp_path / "bad.json"), "is not readable JSON"))
    for path, needle in cases:
        with pytest.raises(UsageError, match="imported_draws.d3: ") as err:
            plan({"imported_draws": {"d3": path}})
        assert needle in str(err.value), (needle, str(err.value))
    short = plan({"imported_draws": {"d3": write(
        tmp_path, draws_payload(summaries=[summary(0, [0.9, 0.8])]), "one.json")}})
    with pytest.raises(UsageError, match="holds 1 replicates' summaries, not 2"):
        short.check_imports()


def test_importing_a_defense_this_run_searches_is_refused(tmp_path):
    path = write(tmp_path, draws_payload())
    with pytest.raises(UsageError, match="imported_draws.d3: 'd3' is also in `defenses`"):
        plan({"imported_draws": {"d3": path}, "defenses": ["ft", "d3"]})
    with pytest.raises(UsageError, match="imported_draws.nope: unknown defense"):
        plan({"imported_draws": {"nope": path}})
    with pytest.raises(UsageError, match=r"imported_draws.d3: draws pair only in a replicated"):
        plan({"imported_draws": {"d3": path}, "replicates": 1}).check_imports()


def test_the_command_line_decides_the_protocol_the_file_is_held_to(tmp_path):
    """A file made with --budget 3 on a spec that says 2 pairs with a run given --budget 3
    (and with --replicates 2 on a spec that says 1), and with nothing else."""
    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload(extra={"budget": 3}))}})
    with pytest.raises(UsageError, match=r"\(budget differ"):
        spec.check_imports()
    spec.with_budget(3).check_imports()
    with pytest.raises(UsageError, match=r"\(budget differ"):
        spec.with_budget(4).check_imports()
    one = plan({"replicates": 1,
                "imported_draws": {"d3": write(tmp_path, draws_payload(), "r.json")}})
    one.with_replicates(2).check_imports()
    moved = one.with_paths(cache_dir=str(tmp_path / "elsewhere"))
    assert moved.imported[0].spec.cache_dir == str(tmp_path / "elsewhere")  # the re-run's cache


def test_models_must_be_the_same_keys_and_weights_for_every_member(tmp_path):
    from d3tune.search.imported_draws import check_models

    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload())}})
    (imp,) = spec.imported
    holdout = ["blended_s5", "blended_s6"]
    early = {k: dict(v) for k, v in MODELS.items() if k != "blended_s1000"}  # not built yet
    assert check_models(imp, early, "where", holdout) == 3
    with pytest.raises(UsageError, match=r"where: the models of blended_s1000 are not recorded"):
        check_models(imp, early, "where", holdout, complete=True)  # every replicate has run
    ours = {k: dict(v) for k, v in MODELS.items()}
    assert check_models(imp, ours, "where", holdout, complete=True) == 4
    ours["blended_s6"]["sha256"] = "f" * 64  # same key, other weights: another machine's build
    with pytest.raises(UsageError, match=r"where: the backdoored models of blended_s6 differ"):
        check_models(imp, ours, "where", holdout)
    ours["blended_s6"] = {"cache_key": "other", "sha256": "6" * 64}
    with pytest.raises(UsageError, match="blended_s6 differ"):
        check_models(imp, ours, "where", holdout)
    with pytest.raises(UsageError, match="models of blended_s5, blended_s6 are not recorded"):
        check_models(imp, {}, "where", holdout)  # nothing compared is never "paired"


def test_fingerprints_read_the_cache_record_and_keep_uncached_members(tmp_path):
    import torch

    from d3tune.cache import Entry, ModelCache
    from d3tune.search.imported_draws import fingerprints, recorded_models

    cache = ModelCache(tmp_path / "cache")
    cache.store("key1", Entry({"w": torch.ones(3)}, {}))
    (tmp_path / "population.json").write_text(json.dumps({
        "a_s5": {"cache_key": "key1"}, "a_s6": {"cache_key": "backdoorbench-abc"}}))
    keys = recorded_models([tmp_path / "population.json", tmp_path / "none.json"])
    assert keys == {"a_s5": "key1", "a_s6": "backdoorbench-abc"}
    got = fingerprints(keys, str(tmp_path / "cache"))
    assert got["a_s5"] == {"cache_key": "key1", "sha256": cache.checksum("key1")}
    assert got["a_s6"] == {"cache_key": "backdoorbench-abc", "sha256": None}  # a record's model
    other = ModelCache(tmp_path / "cache2")
    other.store("key1", Entry({"w": torch.zeros(3)}, {}))
    assert other.checksum("key1") != cache.checksum("key1") and len(other.checksum("key1")) == 64


def test_the_spot_check_re_runs_the_recorded_row_and_compares(tmp_path):
    from d3tune.search.imported_draws import BATCHED, EXACT, spot_check

    spec = plan({"imported_draws": {"d3": write(tmp_path, draws_payload())}})
    (imp,) = spec.imported
    seen = []

    def run(rspec, member, params, ref, figures=None):
        seen.append((rspec.replicate, member.id, params, ref))
        return figures or {"der": 0.9, "acc_after": 0.95, "asr_after": 0.05}

    got = spot_check(imp, "where", run)
    assert seen == [(0, "blended_s5", {"defense.lr": 0.01}, None)]  # its params, not the default
    assert got["tolerance"] == EXACT and got["der"] == 0.9
    off = lambda *a: run(*a, figures={"der": 0.9 + 1e-4, "acc_after": 0.95,  # noqa: E731
                                      "asr_after": 0.05})
    with pytest.raises(UsageError, match=r"where: re-running replicate 0's row trial-0 on "
                       r"blended_s5 gives other figures \(der 0.900100 here, 0.900000"):
        spot_check(imp, "where", off)
    batched = copy.deepcopy(imp.spot)
    batched[0]["member_batch"] = 3  # trained beside other members: float tolerance
    from dataclasses import replace

    assert spot_check(replace(imp, spot=batched), "where", off)["tolerance"] == BATCHED
    ref = copy.deepcopy(imp.spot)
    ref[0].update(row="ref-default", reference="default", params={})
    seen.clear()
    spot_check(replace(imp, spot=ref), "where", run)
    assert seen[0][3] is not None and seen[0][3].name == "default"


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
               "models_checked": 7, "git_commits": ["abcdef1234567"],
               "spot_check": {"replicate": 0, "row": "trial-0", "member": "blended_s5",
                              "der": 0.9, "tolerance": 1e-6}}}}
    board = replicated_leaderboard(spec, state, ["ft", "d3"], tmp_path)
    (cmp,) = board.comparisons
    assert (cmp.a, cmp.b, cmp.n, cmp.p) == ("d3", "ft", 4, 1.0)
    text = "\n".join(import_lines(spec, state))
    assert f"d3: draws imported from `{imp.path}` (searched at commit abcdef1234)" in text
    assert "The 7 backdoored models" in text and "gave DER 0.9000" in text


def test_a_resumed_leaderboard_re_takes_an_import_the_spec_changed(tmp_path, monkeypatch):
    from d3tune.search import imported_draws, leaderboard_driver

    first = write(tmp_path, draws_payload())
    spec = plan({"imported_draws": {"d3": first}})
    (imp,) = spec.imported
    monkeypatch.setattr(leaderboard_driver, "_our_models", lambda spec: copy.deepcopy(MODELS))
    spots = []
    monkeypatch.setattr(imported_draws, "spot_check",
                        lambda imp, where: spots.append(imp.path) or {
                            "replicate": 0, "row": "trial-0", "member": "blended_s5",
                            "der": 0.9, "tolerance": 1e-6})
    state_path = tmp_path / "leaderboard.json"
    state = {"defenses": {}}
    leaderboard_driver.take_imports(spec, state, state_path)
    assert state["defenses"]["d3"]["file_sha256"] == imp.sha256 and spots == [first]
    leaderboard_driver.take_imports(spec, state, state_path)  # resumed, unchanged: kept
    assert spots == [first]
    changed = draws_payload()
    changed["summaries"][0]["draws"]["trial-0"][0]["worst_der"] = 0.5
    write(tmp_path, changed)  # the same path, another file
    leaderboard_driver.take_imports(plan({"imported_draws": {"d3": first}}), state, state_path)
    assert spots == [first, first]
    assert state["defenses"]["d3"]["replicates"][0]["draws"]["trial-0"][0]["worst_der"] == 0.5
    searched = plan({"defenses": ["ft", "d3"]})  # d3 moved to `defenses`: searched, not kept
    leaderboard_driver.take_imports(searched, state, state_path)
    assert "d3" not in state["defenses"]
    assert "d3" not in json.loads(state_path.read_text())["defenses"]


@pytest.mark.slow  # ~5 min on 2 cores: a replicated two-defense leaderboard, then its split
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
            # a holdout model: refused before any search
            ("holdout", lambda d: d["models"]["blended_s1"].update(sha256="0" * 64),
             "differ from the ones"),
            # replicate 1's model, built only by this run's second replicate: refused once
            # every replicate has run, before the report (the searches' state is kept)
            ("later", lambda d: d["models"]["blended_s1000"].update(sha256="0" * 64),
             "differ from the ones")):
        bad = json.loads(draws.read_text())
        tamper(bad)
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
        dump_yaml({**spec, "name": name, "defenses": ["fst"], "storage": f"tune-{name}",
                   "imported_draws": {"ft": f"{name}.json"}}, tmp_path / f"{name}.yaml")
        capsys.readouterr()
        assert main(["leaderboard", f"{name}.yaml"]) == 2
        err = capsys.readouterr().err
        # one error line (Ray's workers may have logged their own lines before it)
        (line,) = [x for x in err.splitlines() if "error" in x]
        assert "Traceback" not in err and line.startswith("d3tune: error: "), err
        assert "imported_draws.ft: " in line and needle in line, line
        searched = (tmp_path / f"tune-{name}" / f"{name}-fst.d3tune" / "replicates.json")
        assert searched.exists() == (name == "later")  # refused before or after searching
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("d3tune-leaderboard")
    boards = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("d3tune.kind") == "leaderboard"]
    status = {r.info.run_name: r.info.status for r in boards}
    assert status == {"whole": "FINISHED", "part": "FINISHED", "spot": "FAILED",
                      "holdout": "FAILED", "later": "FAILED"}, status  # a refused import leaves nothing RUNNING



def test_the_published_part_2_draws_pair_with_the_part_3_spec(monkeypatch):
    """The committed Fashion-MNIST draws (part 2) are accepted by the committed part-3 spec
    under today's code: its protocol check would otherwise refuse the next sitting's import
    (the models and the re-run member are checked when that sitting runs)."""
    from pathlib import Path

    from d3tune.specs.leaderboard_spec import load_leaderboard

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.setenv("D3TUNE_SHIPPED_DEFAULTS", "1")  # as the sittings ran: D3's start point
    spec = load_leaderboard("docs/results/leaderboard_fmnist_replicated/part3/spec.yaml")
    spec.check_imports()
    (imp,) = spec.imported
    assert imp.defense == "d3" and len(imp.models) == 24 and imp.spot[0]["member_batch"] == 1
    assert [s["chosen"] for s in imp.summaries] == ["trial-0"] * 3
