"""BackdoorBench records whose backdoors plant, for end-to-end tests: d3tune trains a
PreActResNet-18 with a real attack on the digits upscaled to CIFAR-10's 3x32x32 (written as a
CIFAR-10 python-layout folder), normalised as BackdoorBench normalises CIFAR-10, and writes it
as an ``attack_result.pt`` with its poisoned test set as PNGs beside it (the writers of
benchmarks/d3_pipeline.py, the benchmark that imports such records)."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _pipeline():
    name = "bench_d3_pipeline"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "d3_pipeline.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]


def digits_as_cifar(folder: Path, train_size: int) -> Path:
    """The digits dataset as a CIFAR-10 folder: grey -> 32x32 RGB (nearest upscaling),
    ``train_size`` training images (class-stratified), the whole test split."""
    from d3tune.data import Dataset, load_dataset, subset_train

    d = subset_train(load_dataset("digits"), train_size)
    k = 32 // d.shape[1]
    up = lambda x: x.repeat_interleave(k, 2).repeat_interleave(k, 3).expand(-1, 3, -1, -1)  # noqa: E731
    data = Dataset("cifar10", up(d.x_train).contiguous(), d.y_train, up(d.x_test).contiguous(),
                   d.y_test, d.num_classes, d.mean * 3, d.std * 3, False)
    return _pipeline().write_cifar_folder(folder, data)


def write_planted_record(folder: Path, cifar: Path, attack: dict, epochs: int,
                         seed: int = 0) -> Path:
    """Train ``attack`` (an attack section: name and knobs) on the CIFAR-10 folder with d3tune
    and write the BackdoorBench record."""
    from d3tune.attacks import Backdoor
    from d3tune.backdoorbench import NORMALIZATION
    from d3tune.config import resolve, trial_config
    from d3tune.data import load_dataset
    from d3tune.trial import generator, train_backdoored

    cfg = resolve(trial_config({
        "seed": seed, "device": "cpu", "data": {"name": "cifar10", "data_dir": str(cifar)},
        "attack": attack, "model": {"arch": "preactresnet18"},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.02}}))
    mean, std = NORMALIZATION["cifar10"]  # the imported model is built with these
    data = replace(load_dataset("cifar10", cifar), mean=mean, std=std, hflip=False)
    dev = torch.device("cpu")
    backdoor = Backdoor(data, cfg.attack, generator(cfg.seed, "poison"), dev)
    model, _ = backdoor.train(lambda x, y, **hooks: train_backdoored(cfg, data, x, y, dev,
                                                                      **hooks))
    return _pipeline().write_attack_result(folder, model.state_dict(), *backdoor.test_set())
