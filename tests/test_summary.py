"""The summary `d3tune run` prints, as a user sees it at a given terminal width: the title and the
phase times each on one line at 80 and 120 columns, and, narrower, never a phase name on one line
and its time on the next."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from d3tune.config import resolve, trial_config
from d3tune.runner import print_summary
from d3tune.trial import TrialResult

METRICS = {"acc_before": 0.9811, "asr_before": 1.0, "ra_before": 0.0, "acc_after": 0.9633,
           "asr_after": 0.0123, "ra_after": 0.95, "der": 0.9849}
SECONDS = {"load": 0.12, "attack_train": 13.7, "poison": 0.01, "evaluate": 0.6, "defense": 20.2}
PHASES = ["load 0.1s", "attack_train 13.7s", "poison 0.0s", "evaluate 0.6s", "defense 20.2s"]
TITLE = "badnets on digits (cnn), defense d3, seed 0"


def screen(width: int, cfg=None, seconds=SECONDS) -> list[str]:
    cfg = cfg or resolve(trial_config({"attack": {"name": "badnets"}, "defense": {"name": "d3"}}))
    result = TrialResult(METRICS, [], dict(seconds), "key", False, model=None)
    console = Console(width=width, record=True, file=open(Path("/dev/null"), "w"))
    print_summary(console, cfg, result, total=35.04, out=Path("d3tune_results/runs/x"))
    lines = console.export_text().splitlines()
    # Only a path may run past the width: printed whole, the terminal wraps it and it still
    # copies as one path.
    assert all(len(ln) <= width or ln.startswith(("model from /", "total ")) for ln in lines), lines
    return lines


def line_with(lines: list[str], text: str) -> str:
    found = [ln for ln in lines if text in ln]
    assert len(found) == 1, (text, lines)
    return found[0]


@pytest.mark.parametrize("width", [80, 120])
def test_title_and_phase_times_each_on_one_line(width: int) -> None:
    lines = screen(width)
    assert line_with(lines, TITLE).strip() == TITLE
    times = line_with(lines, PHASES[0])
    assert all(p in times for p in PHASES), lines
    assert "DER" in "".join(lines) and "0.9849" in "".join(lines)
    assert line_with(lines, "total 35.0s").endswith("d3tune_results/runs/x")


@pytest.mark.parametrize("width", [60, 40, 30])
def test_narrow_terminals_never_split_a_phase_from_its_time(width: int) -> None:
    lines = screen(width)
    if width >= 40:  # the table too: every figure whole
        for figure in ("0.9811", "1.0000", "0.9633", "0.0123", "0.9500", "0.9849"):
            assert figure in "\n".join(lines), lines
    for phase in PHASES:
        line_with(lines, phase)
    words = re.findall(r"[\w,()]+", TITLE)
    assert " ".join(w for ln in lines for w in ln.split() if w in words).startswith(
        " ".join(words[:5]))  # the title is all there, in order, broken only between words


def test_long_phases_and_an_imported_model_still_fit_80_columns() -> None:
    cfg = resolve(trial_config({
        "data": {"name": "cifar10", "data_dir": "/data/cifar"}, "model": {"arch": "preactresnet18"},
        "attack": {"name": "backdoorbench",
                   "result": "/home/someone/backdoorbench/record/blended_0_1_preactresnet18/"
                             "attack_result.pt"},
        "defense": {"name": "d3"}}))
    seconds = {"load": 4.2, "import": 3.1, "poison": 0.0, "evaluate": 612.3, "defense": 4711.9}
    lines = screen(80, cfg, seconds)
    title = "backdoorbench on cifar10 (preactresnet18), defense d3, seed 0"
    assert line_with(lines, title).strip() == title
    times = line_with(lines, "load 4.2s")
    assert all(p in times for p in ["import 3.1s", "evaluate 10m12s", "defense 1h18m"]), lines
    assert any("blended_0_1_preactresnet18" in ln for ln in lines)
