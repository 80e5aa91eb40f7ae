"""Robust and leaderboard populations on datasets read from folders, and on BackdoorBench
records: a folder per dataset in the spec or on the command line, records that find their
data, and one line (exit 2) for every way the input can be wrong."""
from __future__ import annotations

import logging
import shutil
import textwrap
from pathlib import Path

import pytest
from test_backdoorbench import bb_state_dict, make_record
from test_real_datasets import write_cifar

from d3tune.errors import UsageError
from d3tune.specs.leaderboard_spec import leaderboard_plan
from d3tune.specs.robust_spec import member_config, robust_plan
from d3tune.yamlio import parse_yaml

SPEC = """
name: folders
defense: d3
base:
  defense: {epochs: 1}
population:
%s
  seeds: [0]
holdout_seeds: [1]
budget: 1
space:
  defense.eps: {uniform: [0.0, 0.3]}
"""


def spec_of(population: str, **kw):
    text = textwrap.dedent(SPEC) % textwrap.indent(textwrap.dedent(population).strip(), "  ")
    return robust_plan(parse_yaml(text, "spec"), "folders.yaml", **kw)


@pytest.fixture
def bb_root(tmp_path, monkeypatch):
    """A BackdoorBench checkout as its attack scripts leave it: records under record/<name>/,
    the clean data where they read it (./data/cifar10, relative to the checkout)."""
    root = tmp_path / "BackdoorBench"
    state = bb_state_dict()
    for name in ("badnet_demo", "blended_demo"):
        make_record(root / "record" / name, size=32, n=4, state=state)
    write_cifar(root / "data" / "cifar10", n=6)
    monkeypatch.chdir(tmp_path)
    return root


def test_dataset_entries_carry_their_folder_and_train_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = spec_of("""
        attacks: [badnets]
        datasets: [digits, {name: cifar10, data_dir: data/c10, train_size: 500}]""")
    assert [m.id for m in spec.members] == ["badnets_digits_s0", "badnets_cifar10_s0"]
    digits, cifar = (m.fields for m in spec.members)
    assert "data.data_dir" not in digits
    assert cifar["data.data_dir"] == str(tmp_path / "data" / "c10")  # relative to the cwd
    cfg = member_config(spec, spec.holdout[1], {})
    assert (cfg.data.name, cfg.data.data_dir, cfg.data.train_size) == (
        "cifar10", str(tmp_path / "data" / "c10"), 500)


def test_command_line_folder_overrides_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = "attacks: [badnets]\ndatasets: [{name: cifar10, data_dir: spec_dir}]"
    spec = spec_of(one, data_dirs={None: "cli_dir"})
    assert {m.fields["data.data_dir"] for m in spec.members + spec.holdout} == {
        str(tmp_path / "cli_dir")}
    two = "attacks: [badnets]\ndatasets: [cifar10, gtsrb]"
    spec = spec_of(two, data_dirs={"cifar10": "c", "gtsrb": "g"})
    assert [m.fields["data.data_dir"] for m in spec.members] == [str(tmp_path / "c"),
                                                                  str(tmp_path / "g")]
    with pytest.raises(UsageError, match=r"^--data-dir: the population spans cifar10, gtsrb: "
                                         r"name the dataset"):
        spec_of(two, data_dirs={None: "d"})
    with pytest.raises(UsageError, match=r"^--data-dir gtsrb=g: no member of folders.yaml uses"):
        spec_of(one, data_dirs={"gtsrb": "g"})


@pytest.mark.parametrize("population, needle", [
    ("attacks: [badnets]\ndatasets: [cifar10]",
     "population.datasets: [{name: cifar10, data_dir: FOLDER}] or --data-dir: dataset 'cifar10' "
     "is read from a folder and none is given"),
    ("attacks: [badnets]\ndatasets: [digits, digits]", "population.datasets: a dataset is "
     "listed twice"),
    ("attacks: [badnets]\ndatasets: [{name: cifar10, folder: x}]",
     "population.datasets[0]: expected a dataset name or {name: NAME, data_dir"),
    ("attacks: [badnets]\ndatasets: [{name: cifar10, data_dir: 3}]",
     "population.datasets[0].data_dir: expected a folder"),
    ("attacks: [badnets]\ndatasets: [{name: digits, train_size: 2}]",
     "data.train_size: expected a value >= 10"),
])
def test_bad_dataset_entries_name_the_field(population, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as err:
        spec_of(population)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_base_cannot_set_a_folder_or_an_evaluation(tmp_path):
    text = textwrap.dedent(SPEC) % "  attacks: [badnets]"
    for base, needle in (("data: {data_dir: x}", "base.data.data_dir: a population field"),
                         ("eval: {every: 1}", "base.eval.every: a robust search scores each")):
        data = parse_yaml(text.replace("defense: {epochs: 1}", f"defense: {{epochs: 1}}\n  {base}"),
                          "spec")
        with pytest.raises(UsageError, match=needle):
            robust_plan(data, "folders.yaml")


def test_records_bring_dataset_and_arch_and_find_their_recorded_data(bb_root, caplog):
    """No folder named: each record's recorded ./data/cifar10 is found in the BackdoorBench
    checkout holding it, and the log says which folder was used."""
    with caplog.at_level(logging.WARNING, logger="d3tune.specs.records"):
        spec = spec_of("""
            records: [BackdoorBench/record/badnet_demo/attack_result.pt,
                      BackdoorBench/record/blended_demo/attack_result.pt]""")
    assert [m.id for m in spec.members] == ["bb-badnet-demo_s0", "bb-blended-demo_s0"]
    cfg = member_config(spec, spec.members[0], {})
    assert (cfg.data.name, cfg.model.arch, cfg.attack.name) == ("cifar10", "preactresnet18",
                                                                "backdoorbench")
    assert cfg.data.data_dir == str(bb_root / "data" / "cifar10")
    assert cfg.attack.params.result == str(bb_root / "record" / "badnet_demo" / "attack_result.pt")
    used = [r.getMessage() for r in caplog.records]
    assert any(f"using {bb_root / 'data' / 'cifar10'} (the record's data_path './data/cifar10')"
               in m for m in used), used


def test_record_whose_data_cannot_be_found_names_every_path_and_the_field(bb_root):
    shutil.rmtree(bb_root / "data")
    with pytest.raises(UsageError) as err:
        spec_of("records: [BackdoorBench/record/badnet_demo/attack_result.pt]")
    msg = str(err.value)
    assert msg.startswith("population.datasets: [{name: cifar10, data_dir: FOLDER}] or "
                          "--data-dir: ")
    for tried in (bb_root / "record" / "badnet_demo" / "data" / "cifar10",
                  bb_root / "data" / "cifar10", bb_root.parent / "data" / "cifar10"):
        assert str(tried) in msg, msg
    assert "\n" not in msg


def test_record_folder_from_the_spec_or_command_line_wins(bb_root, tmp_path):
    write_cifar(tmp_path / "mine", n=3)
    rec = "BackdoorBench/record/badnet_demo/attack_result.pt"
    spec = spec_of(f"records: [{rec}]\ndatasets: [{{name: cifar10, data_dir: mine}}]")
    assert spec.members[0].fields["data.data_dir"] == str(tmp_path / "mine")
    spec = spec_of(f"records: [{rec}]", data_dirs={None: "mine"})
    assert spec.members[0].fields["data.data_dir"] == str(tmp_path / "mine")


@pytest.mark.parametrize("population, needle", [
    ("records: [BackdoorBench/record/badnet_demo/attack_result.pt]\ndatasets: [gtsrb]",
     "population.records[0]: {root}/record/badnet_demo/attack_result.pt holds a 'preactresnet18' "
     "trained on cifar10, which the population's datasets/archs leave out (name gtsrb)"),
    ("records: [BackdoorBench/record/badnet_demo/attack_result.pt]\narchs: [cnn]",
     "which the population's datasets/archs leave out (arch cnn)"),
    ("records: [BackdoorBench/record/badnet_demo/attack_result.pt, "
     "BackdoorBench/record/../record/badnet_demo/attack_result.pt]",
     "population.records[1]: BackdoorBench/record/../record/badnet_demo/attack_result.pt is "
     "listed twice"),
    ("records: [BackdoorBench/record/nothing/attack_result.pt]",
     "population.records[0]: {root}/record/nothing/attack_result.pt: no such file"),
])
def test_bad_records_are_one_line(bb_root, population, needle):
    with pytest.raises(UsageError) as err:
        spec_of(population)
    assert needle.format(root=bb_root) in str(err.value), str(err.value)


def test_records_in_folders_of_the_same_name_keep_distinct_ids(bb_root):
    shutil.copytree(bb_root / "record" / "badnet_demo", bb_root / "other" / "badnet_demo")
    spec = spec_of("""
        records: [BackdoorBench/record/badnet_demo/attack_result.pt,
                  BackdoorBench/other/badnet_demo/attack_result.pt]""")
    assert [m.id for m in spec.members] == ["bb-record-badnet-demo_s0", "bb-other-badnet-demo_s0"]


def test_a_record_pairs_only_with_its_own_dataset(bb_root):
    """Attacks cross every dataset; a record runs on the dataset it was trained on."""
    spec = spec_of("""
        attacks: [badnets]
        records: [BackdoorBench/record/badnet_demo/attack_result.pt]
        datasets: [digits, {name: cifar10, data_dir: BackdoorBench/data/cifar10}]""")
    assert [m.id for m in spec.members] == ["badnets_digits_s0", "badnets_cifar10_s0",
                                            "bb-badnet-demo_cifar10_s0"]


def test_leaderboard_takes_the_folders_for_every_defense(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = parse_yaml(textwrap.dedent("""
        name: lb
        defenses: [d3, ft]
        population: {attacks: [badnets], datasets: [cifar10], seeds: [0]}
        holdout_seeds: [1]
        budget: 1
        start_with_default: false  # CIFAR-10's profile lies outside the digits-sized spaces
        """), "lb.yaml")
    spec = leaderboard_plan(data, "lb.yaml", {None: "c10"})
    assert {m.fields["data.data_dir"] for s in spec.searches for m in s.members + s.holdout} \
        == {str(tmp_path / "c10")}


# --- the command line ------------------------------------------------------------------------


def write_spec(path: Path, population: str) -> Path:
    path.write_text(textwrap.dedent(SPEC) % textwrap.indent(textwrap.dedent(population).strip(),
                                                            "  "))
    return path


@pytest.mark.parametrize("command", ["robust", "leaderboard"])
def test_cli_missing_folder_is_one_line_exit_2(command, tmp_path, monkeypatch, capsys):
    from d3tune.cli import main

    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "s.yaml", "attacks: [badnets]\ndatasets: [cifar10]")
    if command == "leaderboard":
        text = spec.read_text().replace("defense: d3\n", "defenses: [d3]\n").replace(
            "space:\n  defense.eps: {uniform: [0.0, 0.3]}\n", "").replace(
            "base:\n  defense: {epochs: 1}\n", "start_with_default: false\n")
        spec.write_text(text)
    assert main([command, str(spec), "--data-dir", "nowhere", "--storage", "st"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"data.data_dir: '{tmp_path / 'nowhere'}' is not a directory" in err, err
    assert not (tmp_path / "st").exists()  # refused before Ray or any output


def test_cli_data_dir_flags():
    from d3tune.cli.robust_commands import data_dir_flags

    assert data_dir_flags(None) is None
    assert data_dir_flags(["a=b/c"]) == "a=b/c"  # not a dataset name: a folder
    assert data_dir_flags(["cifar10=/x", "gtsrb=/y"]) == {"cifar10": "/x", "gtsrb": "/y"}
    with pytest.raises(UsageError, match="name each one's dataset"):
        data_dir_flags(["/x", "/y"])
    with pytest.raises(UsageError, match="cifar10 is given twice"):
        data_dir_flags(["cifar10=/x", "cifar10=/y"])


def test_run_attack_result_finds_the_recorded_folder(bb_root):
    """``d3tune run --attack-result`` resolves a record's folder as a population does."""
    from d3tune.cli import build_parser, trial_dict_from_args

    rec = bb_root / "record" / "badnet_demo" / "attack_result.pt"
    args = build_parser().parse_args(["run", "--attack-result", str(rec)])
    d = trial_dict_from_args(args)
    assert d["data"] == {"name": "cifar10", "data_dir": str(bb_root / "data" / "cifar10")}
    args = build_parser().parse_args(["run", "--attack-result", str(rec), "--data-dir", "x"])
    assert trial_dict_from_args(args)["data"]["data_dir"] == "x"


# --- every node of a cluster sees the folders -------------------------------------------------


def test_a_folder_missing_on_a_node_is_one_line_naming_it(local_ray, tmp_path):
    import ray

    from d3tune.search.tuner import require_on_every_node

    here = tmp_path / "data"
    here.mkdir()
    require_on_every_node({str(here): "data.data_dir"})
    gone = tmp_path / "gone"
    with pytest.raises(UsageError) as err:
        require_on_every_node({str(here): "data.data_dir", str(gone): "attack.result"})
    node = ray.nodes()[0]
    assert str(err.value).startswith(f"attack.result: {gone} is missing on node "
                                     f"{node['NodeManagerAddress']} ({node['NodeID'][:12]})")
