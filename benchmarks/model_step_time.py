"""Training-step time per sample of each AV-MNIST network at several spectrogram sizes (CPU or GPU).

Usage: python -m benchmarks.model_step_time [--sizes 16 32 112] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.models.registry import DISPLAY_NAMES, build_network
from pipeline.training.runtime import resolve_device


def step_time(arch: str, inputs: list[str], size: int, batch: int, device: torch.device, steps: int = 20) -> float:
    shapes = {"m1": (1, 28, 28), "m2": (1, size, size)}
    net = build_network(arch, inputs, 10, [shapes[k] for k in inputs]).to(device)
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    data = {k: torch.rand(batch, *shapes[k], device=device) for k in inputs}
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(steps + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(net(data), y).backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 112])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"{'network':16s} " + " ".join(f"{f'S={s}':>10s}" for s in args.sizes) + "   (ms per sample per step)")
    for arch, inputs in (("lenet5", ["m1"]), ("three_layer_cnn_a", ["m2"]), ("cnn_i", ["m1", "m2"])):
        times = [step_time(arch, inputs, s, args.batch, device) * 1e3 for s in args.sizes]
        print(f"{DISPLAY_NAMES[arch]:16s} " + " ".join(f"{t:10.3f}" for t in times))


if __name__ == "__main__":
    main()
