"""``d3tune run``: one trial with a progress bar, a summary table, local results and MLflow.

Results are written to a local folder first (result.json and the defended weights as
safetensors), then logged to MLflow; if the tracking store fails the run still completes and
says where its results are, so nothing is lost to a tracking outage.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from d3tune import tracking
from d3tune.attacks import ATTACKS
from d3tune.cache import Entry, ModelCache
from d3tune.config import TrialConfig, flatten, to_dict
from d3tune.data import Dataset, load_dataset
from d3tune.runstate import now_ms
from d3tune.specs.inputs import check_paths
from d3tune.trial import TrialResult, check_import, run_trial

log = logging.getLogger(__name__)


def prepare(cfg: TrialConfig) -> tuple[Dataset, float]:
    """The trial's data, loaded and checked against an imported model, and the seconds that took.

    Why before anything else: a folder that does not load, or a record that does not fit the
    data, is a usage error, and its one line must be all the user sees: no progress bars, no
    results folder, no MLflow run left open."""
    imported = check_paths(cfg)
    start = time.perf_counter()
    data = load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.train_size)
    seconds = time.perf_counter() - start
    if imported is not None:
        check_import(cfg, imported, data)
    return data, seconds


class MlflowRun:
    """A single MLflow run that degrades to a warning (once) if the store misbehaves."""

    def __init__(self, experiment: str, run_name: str, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking.tracking_uri()
        self.client = MlflowClient(self.uri)
        self.exp_id = tracking.experiment_id(self.client, experiment, self.uri)
        self.run_id = self.client.create_run(self.exp_id, run_name=run_name,
                                             tags={"d3tune.kind": "run"}).info.run_id
        self.ok = True
        self.call(lambda: self.client.log_batch(self.run_id, params=[
            _param(k, v) for k, v in tracking.params_for_mlflow(params).items()]))

    def call(self, fn: Callable[[], Any]) -> None:
        if not self.ok:
            return
        try:
            fn()
        except Exception as exc:  # the store is a side channel: never lose the trial to it
            self.ok = False
            log.warning("MLflow logging failed (%s); results stay in the local folder", exc)


class Bars:
    """The run's progress bars, each added when its work begins, so none stands for work that
    does not happen: training the backdoored model (not on a cache hit, not for an imported
    model) and the defense (once the backdoored model is ready; its time counts from there)."""

    def __init__(self, cfg: TrialConfig, console: Console) -> None:
        self.cfg = cfg
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.attack: TaskID | None = None
        self.defense: TaskID | None = None

    def _add(self, description: str, total: int) -> TaskID:
        self.progress.start()  # drawn from the first bar on: an error before it leaves no trace
        return self.progress.add_task(description, total=total, info="")

    def attack_started(self) -> None:
        if self.attack is None:
            self.attack = self._add("backdoored model", self.cfg.train.epochs)

    def attack_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        self.attack_started()
        self.progress.update(self.attack, completed=epoch, info=f"loss {logs.get('loss', 0):.3f}")
        if epoch >= self.cfg.train.epochs:
            self.model_ready()

    def model_ready(self) -> None:
        if self.defense is None:
            self.defense = self._add(f"defense {self.cfg.defense.name}", self.cfg.defense.epochs)

    def defense_epoch(self, row: dict[str, Any]) -> None:
        self.model_ready()
        self.progress.update(self.defense, completed=row["epoch"],
                             info=f"ACC {row['acc']:.3f} ASR {row['asr']:.3f}")

    def stop(self) -> None:
        self.progress.stop()


class WatchedCache:
    """The model cache as the trial sees it, telling the bars whether the backdoored model is
    being trained (a miss) and when it is ready; everything else goes to the cache itself."""

    def __init__(self, cache: ModelCache, bars: Bars) -> None:
        self.cache, self.bars = cache, bars

    def get_or_build(self, key: str, build: Callable[[], Entry]) -> tuple[Entry, bool]:
        def watched() -> Entry:
            self.bars.attack_started()
            return build()

        out = self.cache.get_or_build(key, watched)
        self.bars.model_ready()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def duration(seconds: float) -> str:
    """Short and of near-constant width, so a line of phase times fits a terminal."""
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def pack(items: list[str], width: int, sep: str = "  ") -> list[str]:
    """Lines of at most ``width`` characters, broken only between items: a terminal's own
    wrapping would break inside one ("attack_train" on a line, its time on the next)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


def summary_table(cfg: TrialConfig, result: TrialResult, compact: bool = False) -> Table:
    """ACC/ASR/RA before and after the defense, and its DER. ``compact``: no box and one space
    between columns (38 characters instead of 51), for a narrow terminal."""
    m = result.metrics
    t = Table(box=None, padding=(0, 0, 0, 1), pad_edge=False) if compact else Table()
    for col in ("", "ACC", "ASR", "RA", "DER"):
        t.add_column(col, justify="right", overflow="fold")  # too narrow: fold, never "0.9…"
    t.add_row("backdoored", *(f"{m[f'{k}_before']:.4f}" for k in ("acc", "asr", "ra")), "")
    t.add_row(f"after {cfg.defense.name}",
              *(f"{m[f'{k}_after']:.4f}" for k in ("acc", "asr", "ra")), f"{m['der']:.4f}")
    return t


def print_summary(console: Console, cfg: TrialConfig, result: TrialResult, total: float,
                  out: Path) -> None:
    """Title, table, phase times, where the results are. Why not the table's title and caption:
    rich wraps those to the table's width (41 characters), so the title and the phase times
    broke over several lines at any terminal width. Here each is one line when the terminal is
    wide enough, and otherwise breaks only between its parts."""
    width = console.width
    title = [f"{cfg.attack.name} on {cfg.data.name} ({cfg.model.arch}),",
             f"defense {cfg.defense.name},", f"seed {cfg.seed}"]
    for line in pack(title, width, " "):
        console.print(line, style="bold", highlight=False)
    from d3tune.adopted_defaults import describe_for

    for line in pack(describe_for(cfg.data.name, cfg.defense.name, cfg.defaults).split(" "),
                     width, " "):
        console.print(line, highlight=False, overflow="fold", markup=False)  # "[d3]" is text
    record = getattr(cfg.attack.params, "result", None)
    if record:  # an imported model: its file, whole (soft-wrapped, so it copies as one path)
        console.print(f"model from {record}", soft_wrap=True, highlight=False)
    table = summary_table(cfg, result)
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    if natural > width:
        table = summary_table(cfg, result, compact=True)
    console.print(table)
    phases = [f"{k} {duration(v)}" for k, v in result.seconds.items()]
    for line in pack(phases, width):
        console.print(line, highlight=False)
    console.print(f"total {duration(total)}; results in {out}", soft_wrap=True, highlight=False)


def adopted_params(cfg: TrialConfig) -> dict[str, Any]:
    """Where the run's defense defaults came from, as MLflow params (the provenance of an
    adopted setting: its robust run and file)."""
    from d3tune.adopted_defaults import lookup

    entry = lookup(cfg.data.name, cfg.defense.name) if cfg.defaults == "adopted" else None
    if entry is None:
        return {"defaults.source": "builtin"}
    return {"defaults.source": str(entry.path),
            "defaults.robust_run": entry.provenance.get("robust_run"),
            "defaults.adopted_on": entry.provenance.get("adopted_on")}


def pin_threads(threads: int | None) -> int:
    """Pin torch's CPU threads (None: torch's choice) and return the count in use: results
    depend on it (another count sums floats in another order, docs/results.md), so a run
    records it."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def open_mlflow(cfg: TrialConfig, experiment: str, run_name: str, threads: int,
                out: Path) -> MlflowRun | None:
    """The run's MLflow run with every trial field, the defaults' provenance and the thread
    count as params; None (with a warning) when the store cannot be reached: an unreachable
    store must not cost the trial, whose results still go to ``out``."""
    params = flatten(to_dict(cfg))
    params.update(adopted_params(cfg))
    params["runtime.threads"] = threads
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        return MlflowRun(experiment, run_name, params)
    except Exception as exc:  # noqa: BLE001 - any failure of the store: log and go on
        log.warning("MLflow unavailable (%s); results go to %s only",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__, out)
        return None


def trial_with_bars(cfg: TrialConfig, data: Any, cache: ModelCache | None,
                    mlrun: MlflowRun | None) -> Any:
    """The trial with progress bars (attack epochs, defense epochs) and each evaluated epoch
    logged to MLflow as it comes; the MLflow run is marked FAILED if the trial raises."""
    bars = Bars(cfg, Console(stderr=True))
    if ATTACKS[cfg.attack.name].load_backdoor is not None:
        bars.model_ready()  # imported: nothing to train
    elif cache is None:
        bars.attack_started()  # no cache: the backdoored model is trained now

    def report(row: dict[str, Any]) -> None:
        bars.defense_epoch(row)
        if mlrun is not None:
            mlrun.call(lambda: mlrun.client.log_batch(
                mlrun.run_id, metrics=tracking.metric_batch([row], timestamp_ms=now_ms())))

    try:
        return run_trial(cfg, report=report, data=data, on_attack_epoch=bars.attack_epoch,
                         cache=WatchedCache(cache, bars) if cache is not None else None)
    except BaseException:
        if mlrun is not None:
            mlrun.call(lambda: mlrun.client.set_terminated(mlrun.run_id, "FAILED"))
        raise
    finally:
        bars.stop()


def write_results(out: Path, cfg: TrialConfig, result: Any, total: float,
                  threads: int) -> tuple[Path, dict[str, Any]]:
    """The defended weights (safetensors) and result.json (config, metrics, history, seconds,
    cache key, threads) in ``out``; returns the weights' path and the record."""
    from safetensors.torch import save_file

    weights = out / "defended.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
              str(weights))
    record = {"config": to_dict(cfg), "metrics": result.metrics, "history": result.history,
              "seconds": {**result.seconds, "total": total}, "cache_key": result.cache_key,
              "cache_hit": result.cache_hit, "threads": threads}
    (out / "result.json").write_text(json.dumps(record, indent=1))
    return weights, record


def finish_mlflow(mlrun: MlflowRun, result: Any, record: dict[str, Any], weights: Path,
                  out: Path) -> None:
    """Final metrics and phase seconds, the cache tags, the weights and result.json as
    artifacts, then FINISHED."""
    from mlflow.entities import Metric

    final = [Metric(k, float(v), now_ms(), 0) for k, v in result.metrics.items()]
    final += [Metric(f"seconds_{k}", float(v), now_ms(), 0) for k, v in record["seconds"].items()]
    mlrun.call(lambda: mlrun.client.log_batch(mlrun.run_id, metrics=final, tags=[
        _tag("d3tune.cache_key", result.cache_key),
        _tag("d3tune.cache_hit", str(result.cache_hit))]))
    mlrun.call(lambda: mlrun.client.log_artifact(mlrun.run_id, str(weights)))
    mlrun.call(lambda: mlrun.client.log_artifact(mlrun.run_id, str(out / "result.json")))
    mlrun.call(lambda: mlrun.client.set_terminated(mlrun.run_id, "FINISHED"))


def print_outcome(cfg: TrialConfig, result: Any, total: float, out: Path,
                  mlrun: MlflowRun | None, experiment: str) -> None:
    """The summary table and phase times, then where the MLflow run is and how to open it."""
    console = Console()
    print_summary(console, cfg, result, total, out)
    if mlrun is not None and mlrun.ok:
        console.print(f"MLflow run {mlrun.run_id} in experiment {experiment!r}")
        # The command on a line of its own, so that it copies alone; the page on the next.
        command, then, page = tracking.ui_hint(mlrun.uri, mlrun.exp_id).partition("  then open ")
        console.print(command, soft_wrap=True, highlight=False)
        if then:
            console.print(f"then open {page}", soft_wrap=True, highlight=False)


def run_and_log(cfg: TrialConfig, *, out_dir: str | Path, cache_dir: str | None, use_cache: bool,
                experiment: str, use_mlflow: bool, threads: int | None = None) -> int:
    """One ``d3tune run``: the trial with bars, its files in a fresh folder under ``out_dir``,
    its MLflow run, the console summary; returns the exit status (0). ``threads`` pins torch's
    CPU threads, and the run records the count it used (MLflow param ``runtime.threads``,
    ``threads`` in result.json). Raises UsageError for bad input before any output."""
    threads_used = pin_threads(threads)
    data, load_seconds = prepare(cfg)  # a usage error ends the run here, before any output
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = f"{cfg.data.name}-{cfg.attack.name}-{cfg.defense.name}-s{cfg.seed}-{stamp}"
    out = Path(out_dir) / run_name
    out.mkdir(parents=True, exist_ok=True)
    mlrun = open_mlflow(cfg, experiment, run_name, threads_used, out) if use_mlflow else None
    total_start = time.perf_counter() - load_seconds
    result = trial_with_bars(cfg, data, ModelCache(cache_dir) if use_cache else None, mlrun)
    total = time.perf_counter() - total_start
    result = replace(result, seconds={**result.seconds,
                                      "load": result.seconds.get("load", 0.0) + load_seconds})
    weights, record = write_results(out, cfg, result, total, threads_used)
    if mlrun is not None:
        finish_mlflow(mlrun, result, record, weights, out)
    print_outcome(cfg, result, total, out, mlrun, experiment)
    return 0


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)

