"""channels_last vs NCHW on the CPU, per architecture: an evaluation forward and a training step.

Why: channels_last became d3tune's CPU default (train.prepare_model) because whole D3 runs were
faster with it; this checks each architecture on its own (train and eval separately), so a model
for which it is slower shows up. Layouts alternate (A B, B A, ...) on a shared machine, medians
are reported with the load average, and the two layouts' logits are compared.

    python benchmarks/channels_last.py                                # cnn (1x8x8) and PreActResNet-18 (3x32x32)
    python benchmarks/channels_last.py --archs vgg19_bn --repeats 7 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from d3tune.models import ModelSpec, build_model

SHAPES = {"cnn": (1, 8)}  # digits' shape; everything else at CIFAR's 3x32x32


def time_arch(arch: str, batch_eval: int, batch_train: int, repeats: int) -> list[str]:
    c, size = SHAPES.get(arch, (3, 32))
    torch.manual_seed(0)
    base = build_model(arch, ModelSpec(10, c, size, (0.5,) * c, (0.25,) * c))
    models = {"NCHW": base, "channels_last": build_model(arch, ModelSpec(
        10, c, size, (0.5,) * c, (0.25,) * c))}
    models["channels_last"].load_state_dict(base.state_dict())
    models["channels_last"] = models["channels_last"].to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (max(batch_eval, batch_train), c, size, size), generator=g,
                      dtype=torch.uint8)
    y = torch.randint(0, 10, (batch_train,), generator=g)
    with torch.no_grad():
        logits = {k: m.eval()(x[:batch_eval]) for k, m in models.items()}  # also a warm-up
    diff = (logits["NCHW"] - logits["channels_last"]).abs().max().item()
    same = (logits["NCHW"].argmax(1) == logits["channels_last"].argmax(1)).float().mean().item()
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.0) for k, m in models.items()}  # lr 0: same weights
    ev: dict[str, list[float]] = {k: [] for k in models}
    tr: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for rep in range(repeats):
        for k in names if rep % 2 == 0 else names[::-1]:
            m = models[k].eval()
            t = time.perf_counter()
            with torch.no_grad():
                m(x[:batch_eval])
            ev[k].append(time.perf_counter() - t)
            m.train()
            t = time.perf_counter()
            loss = F.cross_entropy(m(x[:batch_train]), y)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            tr[k].append(time.perf_counter() - t)
    med = lambda v: statistics.median(v)  # noqa: E731
    load = "%.2f %.2f %.2f" % os.getloadavg()
    return [f"| {arch} | eval {batch_eval} | {med(ev['NCHW']):.3f} | {med(ev['channels_last']):.3f} "
            f"| {med(ev['NCHW']) / med(ev['channels_last']):.2f}x | {diff:.1e} / {same:.3f} | {load} |",
            f"| {arch} | train step {batch_train} | {med(tr['NCHW']):.3f} | "
            f"{med(tr['channels_last']):.3f} | {med(tr['NCHW']) / med(tr['channels_last']):.2f}x "
            f"| | {load} |"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="cnn,preactresnet18")
    ap.add_argument("--batch-eval", type=int, default=128, help="d3tune's CPU predict batch")
    ap.add_argument("--batch-train", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"medians of {args.repeats}, layouts alternating")
    print("| arch | what | NCHW s | channels_last s | channels_last gain | max logit diff / same "
          "argmax | load avg |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        for line in time_arch(arch, args.batch_eval, args.batch_train, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
