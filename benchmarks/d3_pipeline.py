"""D3 two ways in one process: d3tune's tensor pipeline against a BackdoorBench-style pipeline.

Both start from the same backdoored model (trained once through d3tune's model cache) and run the
same D3: same weights, clean subset, epochs, batch size, seed, and a full evaluation of the clean
and poisoned test sets after every epoch.

  (a) d3tune: ``d3tune.defenses.d3.run`` on device-resident uint8 tensors with batched
      augmentation; its ``on_epoch`` calls ``d3tune.metrics.evaluate`` as ``trial.py`` does.
  (b) reference style, written below the way BackdoorBench's ``defense/d3.py`` does it: the data
      are PIL images; torchvision per-sample transforms (Resize, RandomCrop(pad 4),
      RandomHorizontalFlip where the dataset allows it, ToTensor, Normalize); a torch DataLoader
      (``--workers``, default 0: BackdoorBench's D3 config says 4, which on 2 cores only adds
      process start-up, so 0 is the reference's best case here); the loss, projection and
      ``.item()`` per step as in the reference; per epoch, evaluation on clean and poisoned test
      DataLoaders (batch size = the training batch size) in three passes, clean, poisoned-vs-target
      (ASR) and poisoned-vs-true-label (RA), as BackdoorBench's ``eval_step`` does.

The runs use different RNG streams (generator vs global seed), so final ACC/ASR are comparable,
not identical. Repetitions alternate the order (a b, b a, ...) so load on a shared machine hits
both alike; the load average is printed next to every timing.

    python benchmarks/d3_pipeline.py                              # digits, default trial
    python benchmarks/d3_pipeline.py --dataset synthetic --epochs 5 --repeats 1
    python benchmarks/d3_pipeline.py --eval-subset 128            # also report eval.subset's gain
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

from d3tune.attacks import Backdoor, split_state, with_state
from d3tune.cache import Entry, ModelCache, cache_key
from d3tune.config import TrialConfig, resolve, trial_config
from d3tune.data import Dataset, load_dataset
from d3tune.defenses import DEFENSES, DefenseContext, params_of
from d3tune.metrics import EvalSets, evaluate
from d3tune.models import MODELS, ModelSpec, build_model
from d3tune.train import CHANNELS_LAST_ENV, Augment
from d3tune.trial import (attack_settings, clean_subset, generator, model_for, pick_device,
                          train_backdoored)


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
    data = load_dataset(cfg.data.name, cfg.data.data_dir).to(dev)
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


@dataclass
class Run:
    seconds: float = 0.0
    eval_seconds: float = 0.0
    final: dict[str, float] = field(default_factory=dict)


# =============================================================================================
# (a) d3tune's pipeline


def run_d3tune(s: Setup, eval_subset: int | None = None) -> Run:
    """D3 through d3tune, evaluating every epoch as trial.py does (full sets at the last epoch;
    with ``eval_subset`` the other epochs use a fixed subset, d3tune's ``eval.subset``)."""
    out = Run()
    start = time.perf_counter()
    model = model_for(s.cfg, s.data, s.device)
    model.load_state_dict(s.weights)
    last = s.cfg.defense.epochs
    epoch_sets = s.sets.subset(eval_subset, generator(s.cfg.seed, "eval-subset")) \
        if eval_subset else s.sets

    def on_epoch(epoch: int, logs: dict[str, float]) -> bool:
        t = time.perf_counter()
        out.final = evaluate(model, s.sets if epoch == last else epoch_sets)
        out.eval_seconds += time.perf_counter() - t
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
    ap.add_argument("--epochs", type=int, help="D3 epochs (default: the dataset profile's)")
    ap.add_argument("--batch-size", type=int, help="D3 batch size (default: the profile's)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0,
                    help="reference DataLoader workers (BackdoorBench's D3 config: 4)")
    ap.add_argument("--eval-subset", type=int, default=128,
                    help="also time d3tune with eval.subset=N (0: skip)")
    ap.add_argument("--channels-last", action="store_true",
                    help="also time d3tune with D3TUNE_CHANNELS_LAST=1 (opt-in on CPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cache", help="model cache folder (default: d3tune's, ~/.cache/d3tune)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    s = setup(args.dataset, args.arch, args.clean_ratio, args.epochs, args.batch_size,
              args.device, args.seed, ModelCache(args.cache))
    rd = ref_data(s)
    d = s.cfg.defense
    print(f"# D3 pipeline: {s.cfg.data.name}/{s.cfg.model.arch}, clean {len(s.y_clean)} images, "
          f"{d.epochs} epochs, batch {d.batch_size}, eval {len(s.sets.y_clean)} clean + "
          f"{len(s.sets.y_bd_true)} poisoned per epoch, device {s.device}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}")
    with torch.no_grad():
        before = evaluate(model_for_eval(s), s.sets)
    print(f"backdoored model: {fmt(before)}")

    # Warm-up, untimed: one epoch of each (first-call allocations, oneDNN primitive caches).
    warm = replace(s, cfg=replace(s.cfg, defense=replace(s.cfg.defense, epochs=1)))
    run_d3tune(warm)
    run_reference(warm, rd, args.workers)
    pipelines = {"d3tune": lambda: run_d3tune(s),
                 "reference": lambda: run_reference(s, rd, args.workers)}
    if args.eval_subset:
        pipelines[f"d3tune eval.subset={args.eval_subset}"] = lambda: run_d3tune(s, args.eval_subset)
    if args.channels_last:
        pipelines["d3tune channels_last"] = lambda: with_env(CHANNELS_LAST_ENV, "1", run_d3tune, s)
    if args.channels_last and args.eval_subset:
        pipelines[f"d3tune channels_last eval.subset={args.eval_subset}"] = lambda: with_env(
            CHANNELS_LAST_ENV, "1", run_d3tune, s, args.eval_subset)
    times: dict[str, list[float]] = {k: [] for k in pipelines}
    evals: dict[str, list[float]] = {k: [] for k in pipelines}
    finals: dict[str, dict[str, float]] = {}
    names = list(pipelines)
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            r = pipelines[name]()
            times[name].append(r.seconds)
            evals[name].append(r.eval_seconds)
            finals[name] = r.final
            print(f"rep {rep + 1} {name:<28} {r.seconds:7.2f} s (eval {r.eval_seconds:6.2f} s)  "
                  f"{fmt(r.final)}  [{load()}]", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print()
    print("| pipeline | median s | min s | eval s (median) | train s (median) | final ACC "
          "| final ASR | final RA |")
    print("|---|---|---|---|---|---|---|---|")
    for k in names:
        e = statistics.median(evals[k])
        print(f"| {k} | {med[k]:.2f} | {low[k]:.2f} | {e:.2f} | {med[k] - e:.2f} "
              f"| {finals[k]['acc']:.3f} | {finals[k]['asr']:.3f} | {finals[k]['ra']:.3f} |")
    print()
    print(f"speedup: {med['reference'] / med['d3tune']:.2f}x  (reference / d3tune, like for like: "
          f"full evaluation every epoch; medians of {args.repeats}; min-based "
          f"{low['reference'] / low['d3tune']:.2f}x; {torch.get_num_threads()} threads; {load()})")
    if args.channels_last:
        k = "d3tune channels_last"
        print(f"channels_last on CPU: {med['d3tune'] / med[k]:.2f}x over d3tune's default "
              f"(numerics differ slightly from NCHW, so it stays opt-in on CPU)")
    if args.eval_subset:
        k = f"d3tune eval.subset={args.eval_subset}"
        print(f"eval.subset={args.eval_subset} gain: {med['d3tune'] / med[k]:.2f}x over d3tune "
              f"full eval, {med['reference'] / med[k]:.2f}x over the reference "
              f"(not like for like: epochs before the last see a subset)")


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
