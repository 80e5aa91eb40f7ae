"""Malformed sweep and ablation specs: one line on stderr, exit 2, nothing written, no Ray.

Every file in tests/bad_specs/ (*.sweep.yaml -> ``d3tune sweep``, *.ablate.yaml -> ``d3tune
ablate``, *.robust.yaml -> ``d3tune robust``, *.leaderboard.yaml -> ``d3tune leaderboard``) is
run in-process through ``d3tune.cli.main``; EXPECTED.yaml says which field (or line:column, or
reason) its error line must name. A few run as real subprocesses to show that
no traceback reaches the shell.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from d3tune.cli import main
from d3tune.yamlio import load_yaml

BAD = Path(__file__).parent / "bad_specs"
EXPECTED: dict[str, str] = load_yaml(BAD / "EXPECTED.yaml")
SPECS = sorted(p.name for p in BAD.iterdir() if p.name != "EXPECTED.yaml")
REPO = Path(__file__).parent.parent
GOOD_SWEEP = REPO / "search_spaces" / "d3_default.yaml"


def _command(name: str) -> str:
    if name.endswith(".robust.yaml"):
        return "robust"
    if name.endswith(".leaderboard.yaml"):
        return "leaderboard"
    return "sweep" if name.endswith(".sweep.yaml") else "ablate"


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start Ray or run a plan fails the test (everything must stop earlier)."""
    import d3tune.search.sweep_driver
    import d3tune.search.tuner

    def boom(*args, **kwargs):
        raise AssertionError("Ray was about to start for a bad spec")

    monkeypatch.setattr(d3tune.search.sweep_driver, "run_plan", boom)
    monkeypatch.setattr(d3tune.search.tuner, "init_ray", boom)


def _assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("d3tune: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_every_bad_spec_has_an_expectation():
    assert len(SPECS) >= 40
    assert set(SPECS) == set(EXPECTED), set(SPECS) ^ set(EXPECTED)
    assert all(n.endswith((".sweep.yaml", ".ablate.yaml", ".robust.yaml", ".leaderboard.yaml"))
               for n in SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(name, capsys, tmp_path, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main([_command(name), str(BAD / name)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    _assert_one_line_error(err, name, EXPECTED[name])
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no d3tune_results, no Tune folder


@pytest.mark.parametrize("argv,needle", [
    (["sweep", "missing.sweep.yaml"], "missing.sweep.yaml: no such file"),
    (["ablate", "missing.ablate.yaml"], "missing.ablate.yaml: no such file"),
    (["sweep", str(GOOD_SWEEP), "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"],
     "data.data_dir: '/nonexistent/cifar'"),
    (["sweep", str(GOOD_SWEEP), "--dataset", "gtsrb"], "data.data_dir: dataset 'gtsrb'"),
    (["sweep", str(GOOD_SWEEP), "--dataset", "mnist"], "--dataset/--data-dir"),
    (["sweep", str(GOOD_SWEEP), "--num-samples", "0"], "num_samples"),
    (["sweep", str(BAD)], "expected a YAML file"),
])
def test_bad_command_lines_around_a_spec(argv, needle, capsys, tmp_path, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["syntax_binary.sweep.yaml", "alias_bomb.ablate.yaml",
                                  "holdout_overlaps_population.robust.yaml",
                                  "space_wrong_knob.leaderboard.yaml",
                                  "syntax_python_tag.sweep.yaml",
                                  "cifar10_data_dir_missing.sweep.yaml"])
def test_bad_spec_from_the_shell_has_no_traceback(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_ADDRESS"] = ""  # never join a cluster by accident
    proc = subprocess.run([sys.executable, "-m", "d3tune", _command(name), str(BAD / name)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _assert_one_line_error(proc.stderr, name, EXPECTED[name])
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_oversized_spec_is_refused_before_parsing(capsys, tmp_path, tmp_path_factory, monkeypatch,
                                                  no_ray):
    from d3tune.yamlio import MAX_BYTES

    big = tmp_path_factory.mktemp("big") / "huge.sweep.yaml"
    big.write_text("name: huge\n" + "# padding\n" * (MAX_BYTES // 10 + 1))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(big)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "huge.sweep.yaml", f"larger than {MAX_BYTES}")
    assert list(tmp_path.iterdir()) == []
