"""Fashion-MNIST: the IDX reader on files written here, the loader on the real package's files
when Debian's dataset-fashion-mnist is installed, the train-size cut, and bad input as one line."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from d3tune.cli import main
from d3tune.config import resolve, trial_config
from d3tune.data import DATASETS, fashion_mnist, load_dataset, subset_train
from d3tune.data.idx import read_idx, write_idx
from d3tune.errors import UsageError

REAL = fashion_mnist.DEFAULT_DIR
needs_package = pytest.mark.skipif(
    not (REAL / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")


def one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(UsageError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def write_set(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True,
              seed: int = 0) -> dict[str, np.ndarray]:
    """The four files in the official format, with labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "y_train": (np.arange(n_train) % 10).astype(np.uint8),
              "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8)}
    for key, stem in fashion_mnist.FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


# --- the IDX reader ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip_and_header_layout(tmp_path: Path, name: str) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / name
    write_idx(path, a)
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    # The published layout, byte for byte: magic 0x00000803, then 2, 3, 4 as big-endian uint32.
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert raw[16:] == a.tobytes()
    out = read_idx(path, 3)
    assert out.dtype == np.uint8 and np.array_equal(out, a)


def test_idx_bad_magic_truncated_and_corrupt_are_one_line(tmp_path: Path) -> None:
    labels = tmp_path / "labels-idx1-ubyte"
    write_idx(labels, np.arange(5, dtype=np.uint8))
    one_line_error(read_idx, labels, 3, match="magic number 2049")  # a label file as images

    images = tmp_path / "images-idx3-ubyte"
    write_idx(images, np.zeros((4, 28, 28), dtype=np.uint8))
    full = images.read_bytes()
    images.write_bytes(full[:-100])
    one_line_error(read_idx, images, 3, match="holds 3036")
    images.write_bytes(full[:10])
    one_line_error(read_idx, images, 3, match="truncated header")
    images.write_bytes(b"\x00\x00")
    one_line_error(read_idx, images, 3, match="shorter than the 4-byte magic")

    gz = tmp_path / "images-idx3-ubyte.gz"
    write_idx(gz, np.zeros((4, 28, 28), dtype=np.uint8))
    gz.write_bytes(gz.read_bytes()[:-20])
    one_line_error(read_idx, gz, 3, match="truncated or corrupt gzip")
    gz.write_bytes(b"not gzip at all")
    one_line_error(read_idx, gz, 3, match=str(gz))
    one_line_error(read_idx, tmp_path / "missing.gz", 3, match="not found")


# --- the loader on written files -----------------------------------------------------------------

@pytest.mark.parametrize("layout,gz", [("", True), ("", False), ("FashionMNIST/raw", False)])
def test_loader_reads_written_files(tmp_path: Path, layout: str, gz: bool) -> None:
    arrays = write_set(tmp_path / layout if layout else tmp_path, gz=gz)
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_train[7, 0], torch.from_numpy(arrays["x_train"][7]))
    assert ds.y_test.tolist() == arrays["y_test"].tolist()
    assert ds.num_classes == 10 and ds.shape == (1, 28, 28)


def test_loader_bad_files_are_one_line(tmp_path: Path) -> None:
    one_line_error(load_dataset, "fashion_mnist", tmp_path, match="holds no Fashion-MNIST")
    write_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    one_line_error(load_dataset, "fashion_mnist", tmp_path, match="t10k-labels-idx1-ubyte")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8))
    one_line_error(load_dataset, "fashion_mnist", tmp_path, match="10 test images but 9 labels")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, dtype=np.uint8))
    one_line_error(load_dataset, "fashion_mnist", tmp_path, match="got 12")
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 32, 32), dtype=np.uint8))
    one_line_error(load_dataset, "fashion_mnist", tmp_path, match="32x32, expected 28x28")
    one_line_error(load_dataset, "fashion_mnist", tmp_path / "nope", match="not a directory")


def test_missing_package_names_it(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", tmp_path / "not-installed")
    msg = one_line_error(load_dataset, "fashion_mnist", None, match="dataset-fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in msg
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dataset", "fashion_mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset-fashion-mnist" in err
    assert not (tmp_path / "mlflow.db").exists()


# --- the training-set cut and the profile --------------------------------------------------------

def test_subset_train_is_fixed_stratified_and_nested(tmp_path: Path) -> None:
    write_set(tmp_path, n_train=200)
    full = load_dataset("fashion_mnist", tmp_path)
    cut = load_dataset("fashion_mnist", tmp_path, train_size=50)
    assert cut.x_train.shape == (50, 1, 28, 28) and torch.equal(cut.x_test, full.x_test)
    assert torch.bincount(cut.y_train, minlength=10).tolist() == [5] * 10
    again = subset_train(full, 50)
    assert torch.equal(again.x_train, cut.x_train)  # fixed: the trial's seed plays no part
    # Each kept image is one of the full set's, with its own label.
    rows = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(full.x_train, full.y_train)}
    assert all(rows[bytes(x.numpy().tobytes())] == int(y)
               for x, y in zip(cut.x_train, cut.y_train))
    small = subset_train(full, 20)  # a smaller cut is a prefix of the larger one's picks
    assert {bytes(x.numpy().tobytes()) for x in small.x_train} <= {
        bytes(x.numpy().tobytes()) for x in cut.x_train}
    assert subset_train(full, 10_000) is full
    assert cut.fingerprint() != full.fingerprint()  # a cut never reuses the full set's models


def test_profile_resolves_and_flag_overrides() -> None:
    prof = DATASETS["fashion_mnist"].profile
    cfg = resolve(trial_config({"data": {"name": "fashion_mnist"}}))
    assert cfg.data.train_size == prof.train_size and cfg.model.arch == prof.arch
    assert (cfg.train.epochs, cfg.defense.batch_size) == (prof.attack_epochs,
                                                           prof.defense_batch_size)
    cfg = resolve(trial_config({"data": {"name": "fashion_mnist", "train_size": 60000}}))
    assert cfg.data.train_size == 60000
    assert resolve(trial_config({})).data.train_size is None  # digits keeps every image
    with pytest.raises(UsageError, match="data.train_size"):
        trial_config({"data": {"name": "fashion_mnist", "train_size": 3}})


# --- the real files ------------------------------------------------------------------------------

@needs_package
def test_real_package_files() -> None:
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8 and ds.y_test.dtype == torch.int64
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    x = ds.x_train.float() / 255
    assert x.mean().item() == pytest.approx(ds.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(ds.std[0], abs=1e-3)


PLANT_FAST = ("badnets", "blended")  # a patch and a full-image trigger; the rest are slow


@needs_package
@pytest.mark.parametrize("attack", [
    *PLANT_FAST, *(pytest.param(a, marks=pytest.mark.slow)
                   for a in ("lf", "trojan", "input_aware", "wanet", "sig", "lc"))])
# Not here: BppAttack (ASR 0.16 at seed 0 at this size; at its shipped 5 bits it does not plant on
# Fashion-MNIST even at the profile's full schedule: docs/fashion_mnist.md).
def test_attacks_plant_at_tiny_size(attack: str) -> None:
    """Every trigger fits 28x28x1 and a short training run on real images learns the backdoor
    far above chance next to the clean task: 2,000 training images, 6 epochs in batches of 32 at
    lr 0.025, 20 % poisoned, scored on 1,000 test images (BadNets' patch at 5 px: see ``params``).

    The rate is the profile's 0.05 scaled to the smaller batch (the profile trains in batches of
    128). At 0.05 and 4 epochs LF's ASR was 0.31 at seed 0 (CI caught it), and at that rate the
    clean task collapsed in 3 of 8 LF variants tried (ACC 0.31-0.38). Measured with this test's
    settings at seeds 0, 1, 2 (ASR before): BadNets 0.98 0.98 0.98, Blended 1.00 1.00 1.00,
    LF 0.94 0.86 0.89, TrojanNN 1.00 0.70 0.98, Input-Aware 0.86 0.79 0.87, WaNet 0.90 0.96
    0.95, SIG 0.74 0.87 0.82, LC 0.80 0.80 0.97; ACC 0.71-0.78 but for LF at
    seed 2 (0.47). The test runs seed 0."""
    from dataclasses import replace

    from d3tune.trial import run_trial

    data = load_dataset("fashion_mnist", train_size=2000)
    data = replace(data, x_test=data.x_test[:1000], y_test=data.y_test[:1000])
    # a 5-px patch (6 at 32 px): mirror and crop augmentation move the shipped 3-px one too much
    # for 375 steps (ASR 0.82 / 0.49 / 0.76 at seeds 0-2); it plants in the profile's 12 epochs
    params = {"input_aware": {"mask_epochs": 1}, "badnets": {"patch": 6}}.get(attack, {})
    cfg = resolve(trial_config({
        "data": {"name": "fashion_mnist", "train_size": 2000, "clean_count": 64},
        "attack": {"name": attack, "ratio": 0.2, **params},
        "train": {"epochs": 6, "batch_size": 32, "lr": 0.025},
        "defense": {"name": "ft", "epochs": 1},
        "eval": {"subset": 64}}))
    m = run_trial(cfg, data=data).metrics
    assert m["acc_before"] > 0.6, m  # the clean task is learned alongside (chance: 0.1)
    assert m["asr_before"] > 0.5, m  # and the trigger (a clean model: 0.02-0.16)
