"""Training throughput: images/s of one optimisation step for `moco` and `lcr` (and others), in one run.

    .venv/bin/python benchmarks/throughput.py                   # CPU: tiny backbone, 96 px, batch 32
    .venv/bin/python benchmarks/throughput.py --gpu             # ResNet-50, 224 px, batch 128, bf16,
                                                                # next to a supervised ResNet-50 step
    .venv/bin/python benchmarks/throughput.py --variants moco lcr lcr-mlp --steps 30

What is timed is `lcr_core.train.train_step` (query forward + backward, key forward, momentum
update, enqueue; for LCR also the contrastive GradCAM and the fitting loss) on batches already in
memory: the method's cost, not the loader's. One image = one pair of views, as in the paper's
batch size. On a GPU the step runs under bf16 autocast with channels_last tensors, like
`lcr pretrain`. The variants take turns (one timed block each per round, several rounds) so that
a machine shared with other work slows them alike; each variant's figure is its median block.
The supervised reference is a plain torchvision ResNet-50 classification step (cross-entropy,
SGD) on the same batch size and precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcr_core.config import LCRConfig
from lcr_core.model import build_model
from lcr_core.train import build_optimizer, build_scheduler, train_step

SUPERVISED = "supervised-resnet50"
CPU_SETTING = {"backbone": "tiny", "image_size": 96, "batch_size": 32}
GPU_SETTING = {"backbone": "resnet50", "image_size": 224, "batch_size": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="paper setting on CUDA: ResNet-50, 224 px, batch 128, bf16, "
                             "next to a supervised step")
    parser.add_argument("--variants", nargs="+", default=["moco", "lcr"])
    parser.add_argument("--backbone", help="default: tiny on CPU, resnet50 with --gpu")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--queue-size", type=int, help="default: 65536 with --gpu, 32 batches on CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def setting(args: argparse.Namespace) -> dict:
    base = GPU_SETTING if args.gpu else CPU_SETTING
    chosen = {"backbone": args.backbone or base["backbone"],
              "image_size": args.image_size or base["image_size"],
              "batch_size": args.batch_size or base["batch_size"]}
    chosen["queue_size"] = args.queue_size or (65536 if args.gpu else 32 * chosen["batch_size"])
    return chosen


Step = Callable[[], None]


def variant_step(variant: str, chosen: dict, device: torch.device, dtype: torch.dtype | None) -> Step:
    """One closure per variant: a full training step on a fixed batch of random views."""
    cfg = LCRConfig(variant=variant, backbone=chosen["backbone"], image_size=chosen["image_size"],
                    eval_resize=chosen["image_size"], batch_size=chosen["batch_size"],
                    queue_size=chosen["queue_size"], epochs=1).validate()
    model = build_model(cfg).to(device, memory_format=memory_format(device)).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10**6)
    views = (random_images(chosen, device), random_images(chosen, device))
    return lambda: train_step(model, views, optimizer, scheduler, autocast_dtype=dtype)


def supervised_step(chosen: dict, device: torch.device, dtype: torch.dtype | None) -> Step:
    model = torchvision.models.resnet50(num_classes=1000)
    model = model.to(device, memory_format=memory_format(device)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = random_images(chosen, device)
    labels = torch.randint(0, 1000, (chosen["batch_size"],), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def random_images(chosen: dict, device: torch.device) -> torch.Tensor:
    size = chosen["image_size"]
    images = torch.randn(chosen["batch_size"], 3, size, size, device=device)
    return images.contiguous(memory_format=memory_format(device))


def timed_block(step: Step, steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps, waiting for the GPU to finish before reading the clock."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps_by_name: dict[str, Step], args: argparse.Namespace, batch_size: int,
            device: torch.device) -> dict[str, float]:
    """Median images/s per step function over `args.rounds` interleaved blocks."""
    for name, step in steps_by_name.items():
        print(f"warming up {name} ({args.warmup} steps)", flush=True)
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for round_index in range(args.rounds):
        for name, step in steps_by_name.items():
            rates[name].append(args.steps * batch_size / timed_block(step, args.steps, device))
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{n} {r[-1]:.1f} img/s" for n, r in rates.items()), flush=True)
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device visible")
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.gpu else None
    if args.gpu:
        torch.backends.cudnn.benchmark = True
    chosen = setting(args)
    steps = {variant: variant_step(variant, chosen, device, dtype) for variant in args.variants}
    if args.gpu:
        steps[SUPERVISED] = supervised_step(chosen, device, dtype)
    rates = measure(steps, args, chosen["batch_size"], device)
    # On a shared machine the load average says how much to trust the CPU figures.
    hardware = (torch.cuda.get_device_name(device) if args.gpu else
                f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    report = {"device": hardware, "precision": "bf16 autocast" if dtype else "fp32", **chosen,
              "images_per_s": rates}
    print(f"\n{hardware}; {chosen['backbone']} at {chosen['image_size']} px, batch {chosen['batch_size']}, "
          f"queue {chosen['queue_size']}, {report['precision']}")
    reference = rates.get("moco")
    for name, rate in rates.items():
        relative = f"  ({rate / reference:.3f} x moco)" if reference and name != "moco" else ""
        print(f"  {name:>22}: {rate:8.1f} images/s{relative}")
    if SUPERVISED in rates and "lcr" in rates:
        print(f"  lcr / supervised step: {rates['lcr'] / rates[SUPERVISED]:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
