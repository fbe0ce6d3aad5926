"""Fusion throughput in slices/s per method and slice size, on CPU and (when present) CUDA.

Usage: python benchmarks/fusion_speed.py [--sizes 256,512] [--methods all] [--seconds 3] [--threads N]
                                          [--peer-weights OLD.pt --reps 7]
Random inputs (content does not change the cost of any method); batch = fusion.batch_size.
The network is timed without and with explanations (contribution + Grad-CAM saliency), and on
CUDA also with bfloat16 autocast. Prints a markdown table. ``--peer-weights`` instead times the
shipped network against other weights, interleaved, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from dicomnode.config import FusionConfig
from dicomnode.fusion import FusionEngine, available_methods


def throughput(engine: FusionEngine, size: int, batch: int, seconds: float, amp: bool = False) -> float:
    fixed, moving = torch.rand(batch, 1, size, size), torch.rand(batch, 1, size, size)
    if engine.device.type == "cuda":
        fixed, moving = fixed.cuda(), moving.cuda()

    def once():
        with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=amp):
            engine.fuse(fixed, moving)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up: allocations, kernel selection
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        once()
        done += batch
    return done / (time.perf_counter() - start)


def compare_weights(args) -> None:
    """Shipped network vs ``--peer-weights`` on the CPU, raw forward, interleaved rounds: medians and ratio."""
    size = int(args.sizes.split(",")[0])
    engines = {"shipped": FusionEngine("network", FusionConfig(batch_size=args.batch, saliency=False), "cpu"),
               "peer": FusionEngine("network", FusionConfig(batch_size=args.batch, saliency=False,
                                                            weights=args.peer_weights), "cpu")}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.reps):
        for name, engine in engines.items():
            rates[name].append(throughput(engine, size, args.batch, args.seconds))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, "
          f"{size}², batch {args.batch}, {args.reps} rounds of {args.seconds:g} s")
    for name, values in rates.items():
        print(f"{name}: median {statistics.median(values):.1f} slices/s ({', '.join(f'{v:.1f}' for v in values)})")
    print(f"ratio shipped/peer: {statistics.median(rates['shipped']) / statistics.median(rates['peer']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peer-weights", type=Path, default=None, help="compare the network with these weights")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds for --peer-weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peer_weights:
        compare_weights(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in available_methods()] if args.methods == "all" else args.methods.split(",")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}" + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print("| device | method | " + " | ".join(f"{s}² slices/s" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for device in devices:
        batch = args.batch if device == "cpu" else 256
        for method in methods:
            variants = [(method, False, False)]
            if method == "network":
                variants.append(("network + explanations", True, False))
                if device == "cuda":
                    variants.append(("network bf16", False, True))
            for label, saliency, amp in variants:
                engine = FusionEngine(method, FusionConfig(batch_size=batch, saliency=saliency), device)
                rates = [throughput(engine, s, batch if s <= 256 else max(batch // 4, 1), args.seconds, amp) for s in sizes]
                print(f"| {device} | {label} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
