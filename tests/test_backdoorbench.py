"""Importing BackdoorBench's attack_result.pt: a genuine-format record loads (numpy inside, PNGs
next to it); a malicious pickle is refused before its payload can run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3tune.backdoorbench import AttackResult, load_attack_result
from d3tune.errors import UsageError

H = W = 8
RECORD = "./record/badnet_demo"  # where BackdoorBench's attack scripts write, relative to their cwd


def make_record(folder: Path, *, model_name: str = "preactresnet18", absolute: bool = False,
                n: int = 5) -> tuple[Path, np.ndarray]:
    """A small attack_result.pt in BackdoorBench's layout: numpy arrays and scalars inside, the
    poisoned test PNGs under bd_test_dataset/<label>/<index>.png, paths as the attack script
    stored them (relative to where it ran, i.e. under record/<name>/)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    data_dict = {}
    for k in range(n):
        index, true = np.int64(10 + 3 * k), np.int64(1 + k % 9)
        png = folder / "bd_test_dataset" / "0" / f"{index}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[k]).save(png)
        stored = str(png) if absolute else f"{RECORD}/bd_test_dataset/0/{index}.png"
        data_dict[index] = {"path": stored, "other_info": [np.int64(0), true]}
    record = {
        "model_name": model_name,
        "num_classes": 10,
        "model": {"conv1.weight": torch.randn(64, 3, 3, 3), "linear.weight": torch.randn(10, 512),
                  "linear.bias": torch.zeros(10)},
        "data_path": "./data/cifar10",
        "img_size": [H, W, 3],
        "clean_data": "cifar10",
        "bd_train": {"original_index_array": np.arange(20),
                     "poison_indicator": (np.arange(20) % 10 == 0).astype(np.float64),
                     "bd_data_container": {"save_folder_path": f"{RECORD}/bd_train_dataset",
                                           "data_dict": {}, "save_file_format": ".png"}},
        "bd_test": {"original_index_array": np.array(sorted(int(i) for i in data_dict)),
                    "poison_indicator": np.ones(n),
                    "bd_data_container": {"save_folder_path": f"{RECORD}/bd_test_dataset",
                                          "data_dict": data_dict, "save_file_format": ".png"}},
    }
    path = folder / "attack_result.pt"
    torch.save(record, path)
    return path, images


def test_genuine_record_loads(tmp_path):
    path, images = make_record(tmp_path)
    # The file really needs numpy globals: a plain weights_only load refuses it.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    r = load_attack_result(path)
    assert isinstance(r, AttackResult)
    assert (r.model_name, r.arch, r.num_classes, r.dataset) == ("preactresnet18", "preactresnet18",
                                                               10, "cifar10")
    assert r.image_shape == (3, H, W) and r.mean == (0.4914, 0.4822, 0.4465)
    assert set(r.state_dict) == {"conv1.weight", "linear.weight", "linear.bias"}
    assert r.x_bd_test.dtype == torch.uint8 and r.x_bd_test.shape == (5, 3, H, W)
    assert torch.equal(r.x_bd_test, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert r.y_bd_target.tolist() == [0] * 5
    assert r.y_bd_true.tolist() == [1, 2, 3, 4, 5]
    assert r.bd_test_index.tolist() == [10, 13, 16, 19, 22]
    assert r.poison_train_index.tolist() == [0, 10]


def test_absolute_image_paths(tmp_path):
    path, images = make_record(tmp_path, absolute=True)
    assert torch.equal(load_attack_result(path).x_bd_test,
                       torch.from_numpy(images).permute(0, 3, 1, 2))


class Payload:
    """Pickles to a call that creates a file: proof of code execution if it ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "attack_result.pt"
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": {},
                "evil": Payload(marker)}, path)
    with pytest.raises(UsageError) as err:
        load_attack_result(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name, words", [("vit_b_16", "not supported"),
                                         ("resnet18", "supported BackdoorBench models")])
def test_unsupported_models(tmp_path, name, words):
    path, _ = make_record(tmp_path, model_name=name)
    with pytest.raises(UsageError, match=words):
        load_attack_result(path)


def test_unreadable_inputs_are_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_attack_result(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="junk.pt"):
        load_attack_result(junk)
    path, _ = make_record(tmp_path)
    next((tmp_path / "bd_test_dataset" / "0").glob("*.png")).unlink()
    with pytest.raises(UsageError, match="not found") as err:
        load_attack_result(path)
    assert "\n" not in str(err.value)
    path, _ = make_record(tmp_path)
    next((tmp_path / "bd_test_dataset" / "0").glob("*.png")).write_bytes(b"garbage")
    with pytest.raises(UsageError, match="unreadable PNG"):
        load_attack_result(path)
