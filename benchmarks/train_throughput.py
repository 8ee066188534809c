"""Training throughput of edgemap's CPU settings vs plain fp32 contiguous tensors, in one run.

    python benchmarks/train_throughput.py [--size 128] [--batch 32] [--steps 6] [--backbone efficientnet_lite0]

Both variants run full training steps (forward, backward, AdamW) of the same model on the
same batch, interleaved round by round so drift hits both alike; the ratio of median
images/s is printed. edgemap's settings = channels_last, plus bf16 autocast where the CPU has
AMX (what `edgemap finetune --precision auto` does; AVX512-BF16 without AMX trains in fp32).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from edgemap.model import build_classifier
from edgemap.runtime.preprocess import PreprocessContract
from edgemap.runtime.sessions import physical_cores
from edgemap.train.hardware import autocast_dtype, cpu_has_fast_bf16


def make_step(channels_last: bool, amp: torch.dtype | None, args: argparse.Namespace):
    c = PreprocessContract(args.size, args.size)
    net = build_classifier(args.backbone, 10, c, pretrained=False, seed=0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=amp) if amp else nullcontext()
        with ctx:
            xx = net.normalize(x).contiguous(memory_format=fmt)
            loss = loss_fn(net.forward_normalized(xx).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(physical_cores())
    amp = autocast_dtype(torch.device("cpu"), "auto")
    variants = {
        "fp32 contiguous (baseline)": make_step(False, None, args),
        "channels_last fp32": make_step(True, None, args),
        "channels_last + bf16 autocast": make_step(True, torch.bfloat16, args),
    }
    chosen = "channels_last + bf16 autocast" if amp else "channels_last fp32"  # what --precision auto picks here
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up
        for _ in range(2):
            step()
    for _ in range(args.rounds):
        for name, step in variants.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t))
    print(f"{args.backbone}, {args.size}px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"CPU bf16 fast path: {cpu_has_fast_bf16()}, torch {torch.__version__}")
    base = statistics.median(rates["fp32 contiguous (baseline)"])
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"  {name:45s} {m:7.1f} img/s   x{m / base:.2f}")
    best = statistics.median(rates[chosen])
    print(f"edgemap's settings here (--precision auto): {chosen}")
    print(f"ratio edgemap settings / fp32 contiguous: {best / base:.2f}x")


if __name__ == "__main__":
    main()
