"""The benchmarks compare like with like: the BackdoorBench-style pipeline in
benchmarks/d3_pipeline.py computes what d3tune computes (loss, augmentation, metrics), and the
GPU-path switches in d3tune.train leave CPU runs working. No timed assertions."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torchvision import transforms

from d3tune.attacks import Backdoor
from d3tune.config import resolve, trial_config
from d3tune.data import Dataset, load_dataset
from d3tune.defenses import d3
from d3tune.metrics import EvalSets, evaluate
from d3tune.models import ModelSpec, Normalize, build_model
from d3tune.train import (AMP_ENV, CHANNELS_LAST_ENV, Augment, augment, autocast_dtype,
                          cross_entropy, fit, make_sgd, predict, prepare_model)
from d3tune.trial import clean_subset, generator, model_for

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


dp = _load("d3_pipeline")
tp = _load("trial_phases")
CPU = torch.device("cpu")


def small_cnn(channels: int = 1, size: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", ModelSpec(10, channels, size, (0.3,) * channels, (0.3,) * channels))


@pytest.fixture(scope="module")
def small_digits() -> Dataset:
    d = load_dataset("digits")
    return Dataset(d.name, d.x_train[:300], d.y_train[:300], d.x_test[:120], d.y_test[:120],
                   d.num_classes, d.mean, d.std, d.hflip)


@pytest.fixture(scope="module")
def setup(small_digits) -> "dp.Setup":
    """A Setup like d3_pipeline's, on a slice of digits, with a briefly trained model."""
    cfg = resolve(trial_config({"device": "cpu", "data": {"clean_count": 32},
                                "defense": {"epochs": 2, "batch_size": 32}}))
    data = small_digits
    backdoor = Backdoor(data, cfg.attack, generator(cfg.seed, "poison"))
    x, y, _ = backdoor.training_set()
    model = model_for(cfg, data, CPU)
    opt, sched = make_sgd(model.parameters(), 0.05, epochs=1)
    fit(model, x, y, epochs=1, batch_size=32, optimizer=opt, scheduler=sched, aug=Augment(),
        generator=torch.Generator().manual_seed(0))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # exact BatchNorm statistics, so a short training predicts varied classes
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.train()(x)
    for m in bns:
        m.momentum = 0.1
    sets = EvalSets(data.x_test, data.y_test, *backdoor.test_set())
    x_clean, y_clean = clean_subset(cfg, data)
    return dp.Setup(cfg, data, model.state_dict(), sets, x_clean, y_clean, CPU)


# --------------------------------------------------------------------------------------------
# The reference-style pipeline computes what d3tune computes


@pytest.mark.parametrize("layer", ["linear", "features"])
@pytest.mark.parametrize("lmd,p", [(0.5, 2.0), (2.0, 1.0)])
def test_reference_loss_and_projection_match_d3tune(layer, lmd, p):
    model = small_cnn()
    ref_layers = dp.ref_select(model, layer)
    ours = [m.weight for m in d3.selected_modules(model, layer)]
    assert [m.weight for m in ref_layers] == ours
    w0 = [w.detach().clone() for w in ours]
    with torch.no_grad():
        for w in ours:
            w.add_(0.05 * torch.randn_like(w))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 1, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (12,), generator=g)
    prm = d3.Params(eps=0.1, lmd=lmd, p=p)

    logits = model(x)
    ref_loss, ref_clean, ref_dist = dp.ref_loss(logits, y, ref_layers, w0, lmd, 0.1, p)
    dist = d3.distance(ours, w0, p)
    loss, clean = d3.d3_loss(logits, y, dist, prm)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(clean, ref_clean)
    torch.testing.assert_close(dist, ref_dist)
    ref_grads = torch.autograd.grad(ref_loss, ours, retain_graph=True)
    grads = torch.autograd.grad(loss, ours)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(a, b)

    before = [w.detach().clone() for w in ours]
    d3.project(ours, [w.norm(p) for w in w0], p)
    mine = [w.detach().clone() for w in ours]
    with torch.no_grad():
        for w, b in zip(ours, before):
            w.copy_(b)
    dp.ref_project(ref_layers, w0, p)
    for a, m in zip(ref_layers, mine):
        torch.testing.assert_close(a.weight.detach(), m)


@pytest.mark.parametrize("channels,hflip", [(1, False), (3, True)])
def test_reference_transforms_match_batched_augmentation(monkeypatch, channels, hflip):
    """Same crop offsets and flips -> the same normalised images, pixel for pixel."""
    n, size = 24, 12
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.zeros(n, dtype=torch.int64)
    mean, std = (0.4,) * channels, (0.2,) * channels
    data = Dataset("t", x, y, x, y, 10, mean, std, hflip)

    gen = torch.Generator().manual_seed(5)
    probe = torch.Generator()
    probe.set_state(gen.get_state())  # the offsets and flips augment() is about to draw
    dy = torch.randint(0, 9, (n,), generator=probe)
    dx = torch.randint(0, 9, (n,), generator=probe)
    flip = torch.rand(n, generator=probe) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    ours = Normalize(mean, std)(augment(x, Augment(pad=4, hflip=hflip), gen))

    tf = dp.ref_transform(data, train=True)
    flips = [t for t in tf.transforms if isinstance(t, transforms.RandomHorizontalFlip)]
    assert len(flips) == int(hflip)
    pil = dp.to_pil(x)
    for i in range(n):
        monkeypatch.setattr(transforms.RandomCrop, "get_params", staticmethod(
            lambda img, out, i=i: (int(dy[i]), int(dx[i]), size, size)))
        for f in flips:
            f.p = 1.0 if flip[i] else 0.0
        torch.testing.assert_close(tf(pil[i]), ours[i], rtol=0, atol=1e-6)
    assert {0, 8} & set(dy.tolist()) and (flip.any() or not hflip)  # borders and flips occurred


def test_both_evaluations_agree(setup):
    model = dp.model_for_eval(setup)
    ours = evaluate(model, setup.sets)
    rd = dp.ref_data(setup)
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)  # noqa: E731
    ref = dp.ref_eval_step(dp.ref_model(setup), loader(rd.clean_test), loader(rd.bd_test), CPU)
    assert ours == pytest.approx(ref, abs=1e-6)  # same counts (float32 vs float64 division)
    assert len(predict(model, setup.sets.x_clean).unique()) >= 3  # not one constant class


def test_both_pipelines_run_and_report_metrics(setup):
    a = dp.run_d3tune(setup)
    b = dp.run_reference(setup, dp.ref_data(setup))
    c = dp.run_d3tune(setup, eval_subset=8)  # every epoch, on a tiny subset
    d = dp.run_d3tune(setup, eval_subset=8, every=None)  # d3tune's default schedule
    for r in (a, b, c, d):
        assert set(r.final) == {"acc", "asr", "ra"}
        assert all(0.0 <= v <= 1.0 for v in r.final.values())
        assert 0.0 < r.eval_seconds < r.seconds
    assert a.evals == b.evals == c.evals == setup.cfg.defense.epochs
    assert 1 <= d.evals <= setup.cfg.defense.epochs and d.every >= 1
    assert c.final == a.final == d.final  # the last epoch is always scored on the full sets


@pytest.mark.slow
def test_real_size_mode_runs_end_to_end_on_tiny_sizes(tmp_path, capsys):
    """--real-size: a d3tune-trained PreActResNet-18 written as a BackdoorBench attack_result.pt
    (+ a CIFAR-10-layout folder), imported back, D3 three ways; d3tune default and full eval end
    on identical metrics."""
    dp.main(["--real-size", "--train-size", "100", "--test-size", "40", "--attack-epochs", "1",
             "--attack-train-size", "60", "--epochs", "2", "--eval-subset", "8",
             "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "preactresnet18 (imported attack_result.pt" in out and "clean 5 images" in out
    assert "identical: True" in out and "speedup:" in out and "projection to CIFAR-10" in out
    record = next(tmp_path.glob("record_*/attack_result.pt"))
    assert len(list(record.parent.glob("bd_test_dataset/*/*.png"))) == 36  # non-target of 40
    # --record: the same file timed as any BackdoorBench record is
    dp.main(["--record", str(record), "--data-dir", str(record.parent / "cifar10"),
             "--epochs", "3", "--eval-subset", "8"])
    out = capsys.readouterr().out
    assert f"(BackdoorBench record {record})" in out and "eval.every auto" in out
    assert "identical: True" in out and "speedup:" in out and "eval share" in out


def test_real_size_record_imports_like_a_backdoorbench_file(tmp_path):
    """The file the real-size mode writes is read by d3tune's BackdoorBench importer: weights,
    poisoned images and labels come back as written."""
    from d3tune.backdoorbench import load_attack_result

    g = torch.Generator().manual_seed(0)
    state = build_model("preactresnet18", ModelSpec(10, 3, 32, (0.5,) * 3, (0.2,) * 3)).state_dict()
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    target, true = torch.zeros(6, dtype=torch.int64), torch.arange(1, 7)
    path = dp.write_attack_result(tmp_path, state, x, target, true)
    r = load_attack_result(path)
    assert r.arch == "preactresnet18" and r.clean_data == "cifar10" and r.image_shape == (3, 32, 32)
    assert torch.equal(r.x_bd_test, x) and torch.equal(r.y_bd_target, target)
    assert torch.equal(r.y_bd_true, true)
    assert all(torch.equal(r.state_dict[k], v) for k, v in state.items()
               if not k.startswith("normalize."))
    assert not any(k.startswith("normalize.") for k in r.state_dict)


# --------------------------------------------------------------------------------------------
# GPU-path switches, exercised on the CPU


def test_cpu_defaults_channels_last_on_amp_and_compile_off(monkeypatch):
    for name in (AMP_ENV, CHANNELS_LAST_ENV, "D3TUNE_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    assert autocast_dtype() is None
    model = prepare_model(small_cnn(), CPU)
    conv = model.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not getattr(model, "_compiled_call_impl", None)
    monkeypatch.setenv(CHANNELS_LAST_ENV, "0")
    assert prepare_model(small_cnn(), CPU).features[0][0].weight.is_contiguous()
    monkeypatch.setenv(AMP_ENV, "fp8")
    with pytest.raises(ValueError, match=AMP_ENV):
        autocast_dtype()


def test_bf16_autocast_and_channels_last_run_on_cpu(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (32, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (32,), generator=g)
    monkeypatch.setenv(CHANNELS_LAST_ENV, "0")
    reference = predict(prepare_model(small_cnn(3), CPU), x)
    monkeypatch.setenv(CHANNELS_LAST_ENV, "1")
    model = prepare_model(small_cnn(3), CPU)
    assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (predict(model, x) == reference).float().mean() > 0.95  # same model, other layout
    monkeypatch.setenv(AMP_ENV, "bf16")
    assert autocast_dtype() is torch.bfloat16
    seen = []
    opt, sched = make_sgd(model.parameters(), 0.01, epochs=2)
    fit(model, x, y, epochs=2, batch_size=32, optimizer=opt, scheduler=sched,
        aug=Augment(hflip=True), generator=torch.Generator().manual_seed(0),
        on_epoch=lambda e, logs: seen.append(logs["loss"]))
    assert len(seen) == 2 and all(math.isfinite(v) for v in seen)
    assert predict(model, x).shape == (32,)


def test_tensor_logs_give_the_same_epoch_means_as_float_logs():
    """fit reads tensor logs once per epoch; the means equal the per-step .item() version."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (40, 1, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (40,), generator=g)

    def run(loss_fn):
        model = small_cnn()
        opt, sched = make_sgd(model.parameters(), 0.01, epochs=1)
        seen = []
        fit(model, x, y, epochs=1, batch_size=16, optimizer=opt, scheduler=sched, aug=Augment(),
            generator=torch.Generator().manual_seed(0), loss_fn=loss_fn,
            on_epoch=lambda e, logs: seen.append(logs))
        return seen

    def as_floats(model, xb, yb):
        loss, logs = cross_entropy(model, xb, yb)
        return loss, {k: float(v) for k, v in logs.items()}

    assert run(cross_entropy) == run(as_floats)


# --------------------------------------------------------------------------------------------
# trial_phases.py


def test_trial_phases_measures_a_small_trial(tmp_path, small_digits):
    r = tp.measure({"device": "cpu", "train": {"epochs": 1}, "defense": {"epochs": 1}},
                   str(tmp_path), data=small_digits)
    assert {"load", "attack_train", "poison", "defense", "evaluate"} <= set(r["seconds"])
    assert r["rss_peak_mib"] >= r["rss_base_mib"] > 0 and r["vram_peak_mib"] is None
    assert r["n_train"] == 300 and r["n_clean"] == 30
    out = tp.phase_table(r)
    assert "| **total** |" in out and "peak RSS" in out
    row = tp.growth_row(0.1, r)
    assert len(row) == len(tp.GROWTH_HEADER) and row[3] == 1  # 30 images in batches of 32


@pytest.mark.slow
def test_gpu_session_script_runs_every_step_on_tiny_cpu_sizes(tmp_path):
    """The script a GPU-lent session runs in its one device call: every step must get through
    (flags, imports, output files) before a scarce lease is spent on it."""
    import os
    import subprocess

    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "N_TRAIN": "200", "N_TEST": "60", "ATTACK_EPOCHS": "1",
           "D3_EPOCHS": "1", "PIPE_EPOCHS": "1", "OUT": str(out), "PYTHON": sys.executable,
           "STEP_S": "400"}  # the device limit per step is for a GPU; here load must not fail it
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    steps = ["trial_fp32", "trial_bf16", "trial_bf16_compile", "pipeline"]
    assert [line.split(":")[0].removeprefix("== ") for line in summary] == steps
    assert all(": exit 0 after" in line for line in summary), summary
    assert "DER" in (out / "trial_fp32.txt").read_text()
    assert "speedup:" in (out / "pipeline.txt").read_text()
    assert len(list(out.iterdir())) <= 8  # what one device call can bring back


def test_defense_matrix_merges_saved_rows(tmp_path, capsys):
    """Rows saved by two runs (a slow defense in a process of its own) make one table; the
    backdoored model's row both saved counts once; mean ± std over seeds."""
    import json

    matrix = _load("defense_matrix")
    rows_a = [{"seed": s, "attack": "badnets", "defense": "none", "acc": 0.9, "asr": 1.0,
               "ra": 0.0} for s in (0, 1)]
    rows_a += [{"seed": s, "attack": "badnets", "defense": "d3", "acc": 0.8, "asr": a,
                "ra": 0.7, "der": 0.9, "seconds": 10.0} for s, a in ((0, 0.0), (1, 0.2))]
    rows_b = rows_a[:2] + [{"seed": 0, "attack": "badnets", "defense": "anp", "acc": 0.85,
                            "asr": 0.5, "ra": 0.4, "der": 0.7, "seconds": 99.0}]
    paths = []
    for name, rows in (("a.jsonl", rows_a), ("b.jsonl", rows_b)):
        paths.append(tmp_path / name)
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert matrix.main(["--rows", *map(str, paths)]) is None
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| badnets")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["none", "d3", "anp"]
    assert "0.100 ± 0.141" in lines[1]  # d3's ASR over the two seeds
    assert "0.900 ± 0.000" in lines[0]  # the none row once per seed, not twice


def test_real_size_source_brings_real_images_to_cifar_shape():
    """--real-size-data digits: the real images, pixel for pixel, scaled up to 3x32x32 with the
    grey value on every channel and the labels untouched (a backdoor that can plant)."""
    from d3tune.data import load_dataset

    real = load_dataset("digits")
    src = dp.real_size_source("digits", 50, 20)
    assert src.x_train.shape == (50, 3, 32, 32) and src.x_train.dtype == torch.uint8
    assert torch.equal(src.y_train, real.y_train[:50]) and torch.equal(src.y_test, real.y_test[:20])
    k = 32 // real.x_train.shape[-1]
    assert torch.equal(src.x_train[:, 1, ::k, ::k], real.x_train[:50, 0])
    assert torch.equal(src.x_train[:, 0], src.x_train[:, 2])
    with pytest.raises(SystemExit, match="training and"):
        dp.real_size_source("digits", 10**6, 20)
