"""D3 three ways in one process: d3tune's default, d3tune with full per-epoch evaluation, and a
BackdoorBench-style pipeline.

All start from the same backdoored model (trained once through d3tune's model cache, or imported
from a BackdoorBench attack_result.pt with ``--real-size``) and run the same D3: same weights,
clean subset, epochs, batch size, seed.

  (a) d3tune default: ``d3tune.defenses.d3.run`` on device-resident uint8 tensors with batched
      augmentation (channels_last, d3tune's default layout); its ``on_epoch`` evaluates as
      ``trial.py`` does by default: the epochs d3tune/eval_schedule.py makes due (the first,
      then every k-th, k from its cost model so that evaluation stays near 15 % of training),
      on the fixed class-stratified subset (``eval.subset``, default
      config.DEFAULT_EVAL_SUBSET images per set), and the last on the full clean and poisoned
      test sets.
  (b) reference style, written below the way BackdoorBench's ``defense/d3.py`` does it: the data
      are PIL images; torchvision per-sample transforms (Resize, RandomCrop(pad 4),
      RandomHorizontalFlip where the dataset allows it, ToTensor, Normalize); a torch DataLoader
      (``--workers``, default 0: BackdoorBench's D3 config says 4, which on 2 cores only adds
      process start-up, so 0 is the reference's best case here); the loss, projection and
      ``.item()`` per step as in the reference; per epoch, evaluation on clean and poisoned test
      DataLoaders (batch size = the training batch size) in three passes, clean, poisoned-vs-target
      (ASR) and poisoned-vs-true-label (RA), as BackdoorBench's ``eval_step`` does.
  (c) d3tune full eval: (a) with ``eval.subset: 0`` (``--eval-full``): the full sets every
      epoch, like for like with (b). Its final metrics must equal (a)'s exactly.

(a)/(c) and (b) use different RNG streams (generator vs global seed), so their final ACC/ASR are
comparable, not identical; (a) and (c) must end identical (the script exits 1 otherwise).
``--record PATH --data-dir DIR`` runs the three on any BackdoorBench attack_result.pt, imported
as ``d3tune run --attack-result PATH --data-dir DIR --defense d3`` imports it. Repetitions alternate the order (a b c, c b a, ...) so load on a
shared machine hits all alike; the load average is printed next to every timing.

    python benchmarks/d3_pipeline.py                              # digits, default trial
    python benchmarks/d3_pipeline.py --nchw                       # also time the old NCHW layout
    python benchmarks/d3_pipeline.py --real-size --epochs 3 --train-size 5000 --test-size 1000
    python benchmarks/d3_pipeline.py --record RECORD/attack_result.pt --data-dir CIFAR_DIR
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

from d3tune.attacks import Backdoor, split_state, with_state
from d3tune.cache import Entry, ModelCache, cache_key
from d3tune.config import DEFAULT_EVAL_SUBSET, EvalConfig, TrialConfig, resolve, trial_config
from d3tune.data import Dataset, load_dataset
from d3tune.defenses import DEFENSES, DefenseContext, params_of
from d3tune.eval_schedule import DEFAULT_EVAL_SHARE, due_epochs, interval_for
from d3tune.metrics import EvalSets, evaluate
from d3tune.models import MODELS, ModelSpec, build_model
from d3tune.train import CHANNELS_LAST_ENV, Augment
from d3tune.trial import (attack_settings, check_import, clean_subset, eval_subset_sets,
                          generator, imported_model, model_for, pick_device, train_backdoored)


# =============================================================================================
# Setup: one backdoored model, shared by both pipelines


@dataclass
class Setup:
    cfg: TrialConfig
    data: Dataset
    weights: dict[str, torch.Tensor]
    sets: EvalSets
    x_clean: torch.Tensor
    y_clean: torch.Tensor
    device: torch.device


def setup(dataset: str, arch: str | None, clean_ratio: float | None, epochs: int | None,
          batch_size: int | None, device: str, seed: int, cache: ModelCache) -> Setup:
    spec: dict = {"seed": seed, "device": device, "data": {"name": dataset},
                  "defense": {"name": "d3"}}
    if arch:
        spec["model"] = {"arch": arch}
    if clean_ratio:
        spec["data"]["clean_ratio"] = clean_ratio
    if epochs:
        spec["defense"]["epochs"] = epochs
    if batch_size:
        spec["defense"]["batch_size"] = batch_size
    cfg = resolve(trial_config(spec))
    dev = pick_device(cfg.device)
    data = load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.train_size).to(dev)
    backdoor = Backdoor(data, cfg.attack, generator(cfg.seed, "poison"), dev)

    def build() -> Entry:
        model, state = backdoor.train(lambda x, y, **hooks: train_backdoored(
            cfg, data, x, y, dev, **hooks))
        return Entry(with_state(model.state_dict(), state),
                     {"settings": attack_settings(cfg, data)})

    entry, built = cache.get_or_build(cache_key(attack_settings(cfg, data)), build)
    weights, state = split_state(entry.tensors)
    if not built:
        backdoor.restore({k: v.to(dev) for k, v in state.items()})
    sets = EvalSets(data.x_test, data.y_test, *backdoor.test_set())
    x_clean, y_clean = clean_subset(cfg, data)
    return Setup(cfg, data, weights, sets, x_clean, y_clean, dev)


# =============================================================================================
# Real-size setup: PreActResNet-18 on 3x32x32 data, imported from a BackdoorBench attack_result.pt


def write_cifar_folder(root: Path, data: Dataset) -> Path:
    """``data`` in CIFAR-10's python layout (five training batches, one test batch), so
    d3tune's cifar10 loader reads it as it reads the real set."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    as_rows = lambda x: x.cpu().reshape(len(x), -1).numpy()  # noqa: E731 (R, G, B planes)
    chunks = torch.arange(len(data.y_train)).chunk(5)
    for i, idx in enumerate(chunks, start=1):
        batch = {b"data": as_rows(data.x_train[idx]), b"labels": data.y_train[idx].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"data": as_rows(data.x_test), b"labels": data.y_test.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {b"num_cases_per_batch": len(chunks[0]), b"label_names": [b"c%d" % k for k in range(10)],
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_attack_result(folder: Path, state: dict[str, torch.Tensor], x_bd: torch.Tensor,
                        y_target: torch.Tensor, y_true: torch.Tensor) -> Path:
    """An attack_result.pt as BackdoorBench's attack scripts save it (numpy arrays inside, the
    poisoned test set as PNGs under bd_test_dataset/<label>/<index>.png, weights without
    normalisation buffers): the file ``d3tune run --attack-result`` imports."""
    data_dict = {}
    for k, (img, target, true) in enumerate(zip(x_bd, y_target.tolist(), y_true.tolist())):
        png = folder / "bd_test_dataset" / str(target) / f"{k}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.cpu().permute(1, 2, 0).numpy()).save(png)
        data_dict[np.int64(k)] = {"path": str(png), "other_info": [np.int64(target), np.int64(true)]}
    n = len(data_dict)
    record = {
        "model_name": "preactresnet18", "num_classes": 10, "img_size": [32, 32, 3],
        "clean_data": "cifar10", "data_path": "./data/cifar10",
        "model": {k: v.cpu() for k, v in state.items() if not k.startswith("normalize.")},
        "bd_train": None,
        "bd_test": {"original_index_array": np.arange(n), "poison_indicator": np.ones(n),
                    "bd_data_container": {"save_folder_path": str(folder / "bd_test_dataset"),
                                          "data_dict": data_dict, "save_file_format": ".png"}},
    }
    path = folder / "attack_result.pt"
    torch.save(record, path)
    return path


def real_size_source(name: str, n_train: int, n_test: int, data_dir: str | None = None
                     ) -> Dataset:
    """The images a ``--real-size`` record is trained on, in CIFAR-10's shape (3x32x32 uint8).

    ``synthetic``: class templates plus noise. Cheap, but a BadNets backdoor on it does not
    plant (ASR 0.009 after 2 attack epochs), so "final metrics identical" cannot fail there.
    ``fashion_mnist`` / ``digits``: real images brought to 32x32 (Fashion-MNIST padded by 2
    pixels, digits scaled up by repeating pixels) with the grey value on all three channels, so
    the backdoor plants and D3 has something to remove."""
    from d3tune.data import synthetic

    if name == "synthetic":
        return synthetic.make(n_train=n_train, n_test=n_test)
    real = load_dataset(name, data_dir)
    if n_train > len(real.y_train) or n_test > len(real.y_test):
        raise SystemExit(f"--real-size-data {name}: it has {len(real.y_train)} training and "
                         f"{len(real.y_test)} test images, not {n_train} and {n_test}")

    def to32(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1]
        if 32 % h == 0:
            x = x.repeat_interleave(32 // h, dim=-1).repeat_interleave(32 // h, dim=-2)
        else:
            pad = 32 - h
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return x.expand(-1, 3, -1, -1).contiguous()

    return Dataset(f"{name}32", to32(real.x_train[:n_train]), real.y_train[:n_train],
                   to32(real.x_test[:n_test]), real.y_test[:n_test], real.num_classes,
                   real.mean * 3, real.std * 3, real.hflip)


def real_size_setup(workdir: Path, n_train: int, n_test: int, attack_epochs: int,
                    epochs: int | None, device: str, seed: int,
                    attack_train_size: int | None = None, source: str = "synthetic",
                    source_dir: str | None = None) -> Setup:
    """Train (once, cached in ``workdir``) a BadNets PreActResNet-18 with d3tune on ``synthetic``
    data normalised as BackdoorBench normalises CIFAR-10, write it and the data as an
    attack_result.pt and a CIFAR-10 folder, and import them as ``d3tune run --attack-result``
    would: D3 then runs at the CIFAR-10 profile's defaults (5 % clean data, batch 256, 100
    epochs unless ``epochs``). How good the backdoor is does not change the timing, so
    ``attack_train_size`` may train it on the first images of the poisoned training set only
    (an attack epoch on all 50000 takes ~15 min on 2 CPU cores); the record and the CIFAR-10
    folder still hold all ``n_train`` images, and D3's clean set is 5 % of those."""
    from d3tune.backdoorbench import NORMALIZATION

    mean, std = NORMALIZATION["cifar10"]
    dev = pick_device(device)
    src = replace(real_size_source(source, n_train, n_test, source_dir), mean=mean,
                  std=std).to(dev)
    cfg = resolve(trial_config({"seed": seed, "device": device, "data": {"name": "synthetic"},
                                "model": {"arch": "preactresnet18"},
                                "train": {"epochs": attack_epochs}}))
    backdoor = Backdoor(src, cfg.attack, generator(cfg.seed, "poison"), dev)

    fit = slice(None, attack_train_size)

    def build() -> Entry:
        model, state = backdoor.train(lambda x, y, **hooks: train_backdoored(
            cfg, src, x[fit], y[fit], dev, **hooks))
        return Entry(with_state(model.state_dict(), state), {"settings": attack_settings(cfg, src)})

    entry, built = ModelCache(workdir / "cache").get_or_build(
        cache_key({**attack_settings(cfg, src), "normalization": [mean, std],
                   "attack_train_size": attack_train_size}), build)
    weights, state = split_state(entry.tensors)
    if not built:
        backdoor.restore({k: v.to(dev) for k, v in state.items()})
    record_dir = workdir / (f"record_{source}_{n_train}_{n_test}_{attack_epochs}_"
                            f"{attack_train_size}_{seed}")
    path = record_dir / "attack_result.pt"
    if built or not path.is_file():
        write_cifar_folder(record_dir / "cifar10", src)
        write_attack_result(record_dir, weights, *backdoor.test_set())
    return import_record(path, record_dir / "cifar10", epochs, device, seed)


def import_record(path: Path, data_dir: Path, epochs: int | None, device: str,
                  seed: int) -> Setup:
    """A BackdoorBench attack_result.pt imported as ``d3tune run --attack-result PATH
    --data-dir DIR --defense d3`` imports it (d3tune's profile for the record's dataset: for
    CIFAR-10, 5 % clean data, batch 256, 100 epochs unless ``epochs``)."""
    from d3tune.attacks import ATTACKS
    from d3tune.backdoorbench import read_header

    dev = pick_device(device)
    head = read_header(path)
    if head.dataset is None:
        raise SystemExit(f"{path}: dataset {head.clean_data!r} has no d3tune loader")
    spec = {"seed": seed, "device": device,
            "data": {"name": head.dataset, "data_dir": str(data_dir)},
            "model": {"arch": head.arch},
            "attack": {"name": "backdoorbench", "result": str(path)}, "defense": {"name": "d3"}}
    if epochs:
        spec["defense"]["epochs"] = epochs
    cfg = resolve(trial_config(spec))
    imported = ATTACKS["backdoorbench"].load_backdoor(cfg.attack.params)
    data = load_dataset(cfg.data.name, cfg.data.data_dir)
    check_import(cfg, imported, data)
    data = replace(data, mean=imported.mean, std=imported.std).to(dev)  # the record's, as run does
    model = imported_model(cfg, imported, dev)
    sets = EvalSets(data.x_test, data.y_test, *(t.to(dev) for t in (
        imported.x_bd_test, imported.y_bd_target, imported.y_bd_true)))
    x_clean, y_clean = clean_subset(cfg, data)
    return Setup(cfg, data, model.state_dict(), sets, x_clean, y_clean, dev)


@dataclass
class Run:
    seconds: float = 0.0
    eval_seconds: float = 0.0
    final: dict[str, float] = field(default_factory=dict)
    evals: int = 0  # evaluations during the defense
    every: int = 1  # the interval the schedule used


# =============================================================================================
# (a) d3tune's pipeline


def run_d3tune(s: Setup, eval_subset: int = 0, every: int | None = 1,
               share: float = DEFAULT_EVAL_SHARE) -> Run:
    """D3 through d3tune, evaluating as trial.py does (d3tune/eval_schedule.py): the epochs the
    schedule makes due (``every`` None: d3tune's default, the first epoch and every k-th, k
    from the cost model; 1: every epoch), the last on the full sets, the others on the fixed
    class-stratified subset of ``eval_subset`` images per set (0: the full sets)."""
    out = Run()
    start = time.perf_counter()
    model = model_for(s.cfg, s.data, s.device)
    model.load_state_dict(s.weights)
    last = s.cfg.defense.epochs
    epoch_sets = eval_subset_sets(replace(s.cfg, eval=EvalConfig(subset=eval_subset)), s.sets)
    out.every = every or interval_for(len(s.y_clean),
                                      len(epoch_sets.y_clean) + len(epoch_sets.y_bd_true), share)
    due = due_epochs(last, out.every, first=every is None)

    def on_epoch(epoch: int, logs: dict[str, float]) -> bool:
        if epoch not in due:
            return False
        t = time.perf_counter()
        out.final = evaluate(model, s.sets if epoch == last else epoch_sets)
        out.eval_seconds += time.perf_counter() - t
        out.evals += 1
        return False

    ctx = DefenseContext(num_classes=s.data.num_classes, head=MODELS[s.cfg.model.arch].head,
                         aug=Augment(hflip=s.data.hflip), generator=generator(s.cfg.seed, "defense"),
                         device=s.device, on_epoch=on_epoch)
    DEFENSES["d3"].run(model, s.x_clean, s.y_clean, s.cfg.defense, ctx)
    out.seconds = time.perf_counter() - start
    return out


# =============================================================================================
# (b) reference style: PIL images, per-sample transforms, DataLoader, BackdoorBench's loops


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """uint8 NCHW tensor -> PIL images (grey "L" for one channel, "RGB" for three)."""
    arr = x.cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a)
            for a in arr]


def ref_transform(data: Dataset, train: bool) -> transforms.Compose:
    """BackdoorBench's get_transform: Resize, [RandomCrop(pad 4), flip], ToTensor, Normalize."""
    _, h, w = data.shape
    steps: list = [transforms.Resize((h, w))]
    if train:
        steps.append(transforms.RandomCrop((h, w), padding=4))
        if data.hflip:
            steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    return transforms.Compose(steps)


class PILDataset(torch.utils.data.Dataset):
    """PIL images and one or more label lists; the transform runs per sample in __getitem__."""

    def __init__(self, images: list[Image.Image], *labels: list[int], transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return (self.transform(self.images[i]), *(lbl[i] for lbl in self.labels))


def ref_model(s: Setup) -> nn.Module:
    """The same backdoored weights; normalisation moves from the model into the transforms.
    Built plainly (no channels_last, no compile): the reference has none of d3tune's switches."""
    c, h, w = s.data.shape
    model = build_model(s.cfg.model.arch, ModelSpec(s.data.num_classes, c, min(h, w), s.data.mean,
                                                    s.data.std)).to(s.device)
    model.load_state_dict(s.weights)
    model.normalize = nn.Identity()
    return model


def ref_select(model: nn.Module, name: str) -> list[nn.Module]:
    root = dict(model.named_modules())[name]
    return [m for _, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def ref_init(layers: list[nn.Module], w0: list[torch.Tensor], p: float) -> None:
    """The reference's default warm-up ("random"): uniform(-0.5, 0.5), rescaled to ||W0||_p."""
    for layer, init in zip(layers, w0):
        layer.weight.data.uniform_(-0.5, 0.5)
        layer.weight.data = layer.weight.data * torch.norm(init, p=p) / torch.norm(layer.weight.data, p=p)


def ref_loss(logits: torch.Tensor, labels: torch.Tensor, layers: list[nn.Module],
             w0: list[torch.Tensor], lmd: float, eps: float, p: float):
    """The reference's batch loss, written as it is there."""
    loss_clean_pre = F.cross_entropy(logits, labels, reduction="none")
    loss_clean = F.relu(loss_clean_pre - eps).mean()
    loss_weight = 0
    for i, layer in enumerate(layers):
        loss_weight += torch.norm(layer.weight - w0[i], p=p)
    if lmd > 1:
        loss = (lmd * loss_clean - loss_weight) / (lmd + 1)
    else:
        loss = lmd * loss_clean - loss_weight
    return loss, loss_clean, loss_weight


def ref_project(layers: list[nn.Module], w0: list[torch.Tensor], p: float) -> None:
    for i, layer in enumerate(layers):
        layer.weight.data = layer.weight.data * torch.norm(w0[i], p=p) / torch.norm(layer.weight.data, p=p)


def ref_dataloader_test(model: nn.Module, loader, device: torch.device, label: int = 1):
    """BackdoorBench's given_dataloader_test: loss and accuracy over a loader, batch by batch."""
    model.eval()
    criterion = nn.CrossEntropyLoss()
    correct = total = 0
    loss_sum = 0.0
    preds, labels = [], []
    with torch.no_grad():
        for batch in loader:
            x, target = batch[0].to(device, non_blocking=True), batch[label].to(device, non_blocking=True)
            pred = model(x)
            loss = criterion(pred, target.long())
            _, predicted = torch.max(pred, -1)
            correct += predicted.eq(target).sum().item()
            total += target.size(0)
            loss_sum += loss.item()
            preds.append(predicted.detach().clone().cpu())
            labels.append(target.detach().clone().cpu())
    return {"test_acc": correct / max(1, total), "test_loss_avg_over_batch": loss_sum / max(1, len(loader))}


def ref_eval_step(model: nn.Module, clean_loader, bd_loader, device: torch.device) -> dict[str, float]:
    """Clean pass (ACC), poisoned pass against the target (ASR), poisoned pass against the true
    label (RA): three passes, as the reference's eval_step."""
    acc = ref_dataloader_test(model, clean_loader, device)["test_acc"]
    asr = ref_dataloader_test(model, bd_loader, device, label=1)["test_acc"]
    ra = ref_dataloader_test(model, bd_loader, device, label=2)["test_acc"]
    return {"acc": acc, "asr": asr, "ra": ra}


@dataclass
class RefData:
    """What BackdoorBench hands its D3: PIL datasets (built once, outside the timed run)."""

    clean_train: PILDataset
    clean_test: PILDataset
    bd_test: PILDataset


def ref_data(s: Setup) -> RefData:
    train_tf, test_tf = ref_transform(s.data, True), ref_transform(s.data, False)
    return RefData(
        PILDataset(to_pil(s.x_clean), s.y_clean.tolist(), transform=train_tf),
        PILDataset(to_pil(s.sets.x_clean), s.sets.y_clean.tolist(), transform=test_tf),
        PILDataset(to_pil(s.sets.x_bd), s.sets.y_bd_target.tolist(), s.sets.y_bd_true.tolist(),
                   transform=test_tf))


def run_reference(s: Setup, rd: RefData, workers: int = 0) -> Run:
    out = Run()
    start = time.perf_counter()
    prm = params_of(s.cfg.defense)
    d = s.cfg.defense
    torch.manual_seed(s.cfg.seed)  # fix_random(args.random_seed)
    model = ref_model(s)
    pin = s.device.type == "cuda"
    loader = lambda ds, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        ds, batch_size=d.batch_size, num_workers=workers, shuffle=shuffle, pin_memory=pin)
    train_loader = loader(rd.clean_train, True)
    clean_loader, bd_loader = loader(rd.clean_test, True), loader(rd.bd_test, True)

    layers = ref_select(model, prm.select_layer or MODELS[s.cfg.model.arch].head)
    w0 = [layer.weight.data.clone().detach() for layer in layers]
    ref_init(layers, w0, prm.p)
    opt = torch.optim.SGD(model.parameters(), lr=d.lr, momentum=d.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, d.epochs)
    for _ in range(d.epochs):
        batch_losses = []
        model.train()
        for images, labels in train_loader:
            images = images.to(s.device, non_blocking=True)
            labels = labels.to(s.device, non_blocking=True)
            loss, _, _ = ref_loss(model(images), labels, layers, w0, prm.lmd, prm.eps, prm.p)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ref_project(layers, w0, prm.p)
            batch_losses.append(loss.item())
        sched.step()
        t = time.perf_counter()
        out.final = ref_eval_step(model, clean_loader, bd_loader, s.device)
        out.eval_seconds += time.perf_counter() - t
        out.evals += 1
    out.seconds = time.perf_counter() - start
    return out


# =============================================================================================
# Timing: interleaved repetitions


def load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k.upper()} {m[k]:.3f}" for k in ("acc", "asr", "ra") if k in m)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits", help="digits (default) or synthetic")
    ap.add_argument("--arch", help="architecture (default: the dataset profile's)")
    ap.add_argument("--clean-ratio", type=float, help="default: the dataset profile's")
    ap.add_argument("--epochs", type=int, help="D3 epochs (default: the dataset profile's; "
                    "CIFAR-10's 100 with --real-size)")
    ap.add_argument("--batch-size", type=int, help="D3 batch size (default: the profile's)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--repeats", type=int, help="alternating repetitions (default 3; 1 with "
                    "--real-size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0,
                    help="reference DataLoader workers (BackdoorBench's D3 config: 4)")
    ap.add_argument("--eval-subset", type=int, default=DEFAULT_EVAL_SUBSET,
                    help="d3tune's per-epoch subset for the 'd3tune default' leg (default: "
                    "d3tune's default, %(default)s)")
    ap.add_argument("--nchw", action="store_true",
                    help="also time d3tune full eval with D3TUNE_CHANNELS_LAST=0 (the CPU "
                    "layout before channels_last became the default)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cache", help="model cache folder (default: d3tune's, ~/.cache/d3tune)")
    ap.add_argument("--real-size", action="store_true",
                    help="PreActResNet-18 on 3x32x32 data imported from a BackdoorBench "
                    "attack_result.pt written here; D3 at the CIFAR-10 profile's defaults")
    ap.add_argument("--train-size", type=int, default=50000,
                    help="--real-size: training images (the clean set is 5 %% of them)")
    ap.add_argument("--test-size", type=int, default=10000,
                    help="--real-size: clean test images (the poisoned set is its non-target part)")
    ap.add_argument("--real-size-data", default="synthetic",
                    choices=("synthetic", "fashion_mnist", "digits"),
                    help="--real-size: the images the record is trained on (synthetic: its "
                    "backdoor does not plant; fashion_mnist, digits: real images at 3x32x32)")
    ap.add_argument("--real-size-data-dir", help="--real-size-data's folder (default: the "
                    "dataset's default place)")
    ap.add_argument("--attack-epochs", type=int, default=2,
                    help="--real-size: epochs d3tune trains the backdoored model")
    ap.add_argument("--attack-train-size", type=int,
                    help="--real-size: train the backdoored model on this many of the training "
                    "images only (default: all); the timing of D3 does not depend on it")
    ap.add_argument("--workdir", help="--real-size: where the record, data and model cache go "
                    "(default: a temporary folder)")
    ap.add_argument("--record", metavar="PATH",
                    help="time D3 on this BackdoorBench attack_result.pt (its clean data from "
                    "--data-dir), imported as d3tune run --attack-result imports it")
    ap.add_argument("--data-dir", help="--record: the clean dataset's folder (e.g. CIFAR-10's)")
    ap.add_argument("--eval-every", type=int,
                    help="the 'd3tune default' leg's eval.every (default: d3tune's default, "
                    "from the cost model)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed one-epoch warm-up of each pipeline (default with "
                    "--real-size, where an epoch takes minutes)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    big = args.real_size or args.record
    repeats = args.repeats or (1 if big else 3)

    if args.record:
        if not args.data_dir:
            ap.error("--record needs --data-dir (the record's clean dataset folder)")
        s = import_record(Path(args.record), Path(args.data_dir), args.epochs, args.device,
                          args.seed)
    elif args.real_size:
        tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="d3_real_size_")
        workdir = Path(args.workdir or tmp.name)
        s = real_size_setup(workdir, args.train_size, args.test_size, args.attack_epochs,
                            args.epochs, args.device, args.seed, args.attack_train_size,
                            args.real_size_data, args.real_size_data_dir)
    else:
        s = setup(args.dataset, args.arch, args.clean_ratio, args.epochs, args.batch_size,
                  args.device, args.seed, ModelCache(args.cache))
    rd = ref_data(s)
    d = s.cfg.defense
    source = (f" (BackdoorBench record {args.record})" if args.record else
              f" (imported attack_result.pt, {args.real_size_data} data)" if args.real_size
              else "")
    print(f"# D3 pipeline: {s.cfg.data.name}/{s.cfg.model.arch}{source}, "
          f"clean {len(s.y_clean)} images, {d.epochs} epochs, batch {d.batch_size}, eval "
          f"{len(s.sets.y_clean)} clean + {len(s.sets.y_bd_true)} poisoned (full), "
          f"subset {args.eval_subset} per set, eval.every "
          f"{args.eval_every or 'auto'} (share {DEFAULT_EVAL_SHARE}), device {s.device}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}")
    with torch.no_grad():
        before = evaluate(model_for_eval(s), s.sets)
    print(f"backdoored model: {fmt(before)}  [{load()}]", flush=True)
    if before["asr"] < 0.9:
        print(f"note: the backdoor did not plant (ASR {before['asr']:.3f} < 0.9): final metrics "
              "barely move, so their equality below is weak evidence", flush=True)

    if not (args.no_warmup or big):
        # Untimed: one epoch of each (first-call allocations, oneDNN primitive caches).
        warm = replace(s, cfg=replace(s.cfg, defense=replace(s.cfg.defense, epochs=1)))
        run_d3tune(warm)
        run_reference(warm, rd, args.workers)
    default = f"d3tune default (eval.subset={args.eval_subset})"
    pipelines = {default: lambda: run_d3tune(s, args.eval_subset, args.eval_every),
                 "reference": lambda: run_reference(s, rd, args.workers),
                 "d3tune full eval": lambda: run_d3tune(s)}
    if args.nchw:
        pipelines["d3tune full eval NCHW"] = lambda: with_env(CHANNELS_LAST_ENV, "0", run_d3tune, s)
    times: dict[str, list[float]] = {k: [] for k in pipelines}
    evals: dict[str, list[float]] = {k: [] for k in pipelines}
    finals: dict[str, dict[str, float]] = {}
    evaluations: dict[str, int] = {}
    names = list(pipelines)
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            r = pipelines[name]()
            times[name].append(r.seconds)
            evals[name].append(r.eval_seconds)
            finals[name] = r.final
            print(f"rep {rep + 1} {name:<36} {r.seconds:8.2f} s (eval {r.eval_seconds:7.2f} s, "
                  f"{r.evals} evaluations, {100 * r.eval_seconds / r.seconds:.0f} %)  "
                  f"{fmt(r.final)}  [{load()}]", flush=True)
            evaluations[name] = r.evals

    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print()
    print("| pipeline | median s | min s | eval s (median) | eval share | evaluations "
          "| train s (median) | final ACC | final ASR | final RA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in names:
        e = statistics.median(evals[k])
        print(f"| {k} | {med[k]:.2f} | {low[k]:.2f} | {e:.2f} | {100 * e / med[k]:.0f} % "
              f"| {evaluations[k]} | {med[k] - e:.2f} "
              f"| {finals[k]['acc']:.3f} | {finals[k]['asr']:.3f} | {finals[k]['ra']:.3f} |")
    print()
    full = "d3tune full eval"
    print(f"speedup: {med['reference'] / med[default]:.2f}x  (reference / d3tune default; "
          f"medians of {repeats}; min-based {low['reference'] / low[default]:.2f}x; "
          f"{torch.get_num_threads()} threads; {load()})")
    print(f"like for like: {med['reference'] / med[full]:.2f}x  (reference / d3tune full eval: "
          f"both evaluate the full sets every epoch)")
    same = finals[default] == finals[full]
    print(f"final ACC/ASR/RA of d3tune default and d3tune full eval identical: {same}")
    if args.nchw:
        print(f"channels_last (default) over NCHW: {med['d3tune full eval NCHW'] / med[full]:.2f}x "
              f"(full eval both)")
    if args.real_size:
        print(projection(s, med, evals, full, args.eval_subset, args.eval_every))
    if not same:  # the schedule and the subset must never change a final metric
        raise SystemExit("d3tune default and d3tune full eval ended on different final metrics")


def projection(s: Setup, med: dict[str, float], evals: dict[str, list[float]], full: str,
               subset: int, every: int | None) -> str:
    """The measured per-image costs scaled to CIFAR-10's sizes (2500 clean images, 10000 clean +
    9000 poisoned test images, the same epochs, the evaluation schedule deciding on the
    projected costs): a projection, printed as one, for when the real-size run had to be smaller
    than CIFAR-10 on a CPU."""
    epochs = s.cfg.defense.epochs
    n_clean, n_test, n_bd = len(s.y_clean), len(s.sets.y_clean), len(s.sets.y_bd_true)
    ours_eval = statistics.median(evals[full]) / (epochs * (n_test + n_bd))
    ours_train = (med[full] - statistics.median(evals[full])) / (epochs * n_clean)
    ref_eval = statistics.median(evals["reference"]) / (epochs * (n_test + 2 * n_bd))
    ref_train = (med["reference"] - statistics.median(evals["reference"])) / (epochs * n_clean)
    c, t, b = 2500, 10000, 9000
    ref = epochs * (ref_train * c + ref_eval * (t + 2 * b))
    k = every or interval_for(c, min(subset, t) + min(subset, b))  # as it decides at these sizes
    n_evals = len(due_epochs(epochs, k, first=every is None))
    ours = epochs * ours_train * c + ours_eval * ((n_evals - 1) * 2 * min(subset, b) + t + b)
    return (f"projection to CIFAR-10 sizes (per-image costs measured above; NOT a measurement): "
            f"reference {ref:.0f} s, d3tune default {ours:.0f} s, {ref / ours:.2f}x")


def with_env(name: str, value: str, fn, *args):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn(*args)
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def model_for_eval(s: Setup) -> nn.Module:
    model = model_for(s.cfg, s.data, s.device)
    model.load_state_dict(s.weights)
    return model


if __name__ == "__main__":
    main()
