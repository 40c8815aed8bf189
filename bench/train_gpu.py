"""GPU training throughput: the training step on synthetic tensors against the same step fed from
Parquet shards, triplets/s and MFU, eager and compiled. Run it on a GPU machine (not part of
`make bench`, which runs on CPUs):

    python bench/train_gpu.py --model base --batch-sizes 256 512 --num-workers 14 --output gpu.json

The step is the trainer's own (model.train: TripletForward, triplet_loss, fused AdamW, gradient
clipping, bf16 autocast). "synthetic" feeds it the same random uint8 images and token ids on the
GPU every step: the model's ceiling. "parquet" feeds it from TripletBatches over Parquet shards
(DataLoader workers decoding JPEGs, pinned memory), as `magiclens train` does. The shards are
--data, or are written from the real photos under --images, stored as the mining pipeline stores
them (JPEG, longer side at most 512 px). FLOPs per step come from torch's FlopCounterMode on one
eager step; MFU is achieved FLOP/s over the GPU's dense bf16 peak.

Goals: parquet >= 95% of synthetic in the same run, and >= 1,660 triplets/s on an H200 (the anchor:
923 triplets/s eager at batch 256, 1,660 compiled at batch 512, synthetic, measured on an H200 with
transformers CLIP ViT-B/16 + a 4-layer fusion).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from magiclens.model.checkpoint import build_model  # noqa: E402
from magiclens.model.data import TripletBatches, plan_row_groups, write_triplets  # noqa: E402
from magiclens.model.train import BATCH_TENSORS, TripletForward, optimizer_for, triplet_loss  # noqa: E402

# dense bf16 tensor-core peaks, FLOP/s
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12}


def _peak_flops(name: str, override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    raise SystemExit(f"unknown GPU {name!r}: give its dense bf16 peak with --peak-tflops")


def _write_shards(images: Path, directory: Path, triplets: int) -> str:
    from magiclens.pipeline.images import ImageRejected, normalize_image

    stored = []
    for path in sorted(p for folder in ("photos", "neardup") for p in (images / folder).rglob("*") if p.is_file()):
        try:
            stored.append(normalize_image(path.read_bytes(), min_side=1, max_aspect=100.0).jpeg)
        except ImageRejected:
            continue
    if not stored:
        raise SystemExit(f"no images under {images}: give --images DIR or --data GLOB")
    rng = random.Random(0)
    per_shard = 1024
    for shard in range(0, triplets, per_shard):
        rows = [
            {
                "triplet_id": f"t{i}",
                "query_image": rng.choice(stored),
                "instruction": f"the same place seen from the other side of the street, photo {i}",
                "target_image": rng.choice(stored),
            }
            for i in range(shard, min(shard + per_shard, triplets))
        ]
        write_triplets(str(directory / f"part-{shard // per_shard:05d}.parquet"), rows, row_group_size=256)
    return str(directory / "*.parquet")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_batch(batch_size: int, image_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def pixels() -> torch.Tensor:
        return torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)

    input_ids = torch.randint(1, 49406, (batch_size, 77), generator=generator)
    input_ids[:, 0], input_ids[:, 20:] = 49406, 49407  # 19 tokens, then the end token and padding
    batch = {
        "query_pixels": pixels(),
        "target_pixels": pixels(),
        "query_max": torch.full((batch_size,), 255.0),
        "target_max": torch.full((batch_size,), 255.0),
        "input_ids": input_ids,
        "query_hash": torch.arange(batch_size) + batch_size,
        "target_hash": torch.arange(batch_size),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _measure(args: argparse.Namespace, batch_size: int, compiled: bool, data: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, preprocess = build_model(args.model)
    model.to(device).train()
    forward = TripletForward(model, preprocess)
    step_forward = torch.compile(forward) if compiled else forward
    optimizer = optimizer_for(model, 1e-5, 0.05)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(inputs: dict[str, torch.Tensor]) -> None:
        loss = triplet_loss(step_forward, model.clip.logit_scale, inputs, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synthetic = _synthetic_batch(batch_size, preprocess.image_size, device)
    with FlopCounterMode(display=False) as counter:
        loss = triplet_loss(forward, model.clip.logit_scale, synthetic, autocast)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()

    def timed(next_inputs) -> float:
        for _ in range(args.warmup_steps):
            step(next_inputs())
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step(next_inputs())
        _synchronize(device)
        return args.steps * batch_size / (time.perf_counter() - started)

    synthetic_rate = timed(lambda: synthetic)
    dataset = TripletBatches(
        plan_row_groups(data),
        model.tokenizer,
        preprocess.image_size,
        batch_size,
        num_workers=args.num_workers,
        fixed_text_length=True,
        fast_jpeg=True,
    )
    loader = iter(
        DataLoader(
            dataset, batch_size=None, num_workers=args.num_workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if args.num_workers > 0 else None,  # torch refuses a prefetch without workers
        )
    )

    def next_batch() -> dict[str, torch.Tensor]:
        return {name: tensor.to(device, non_blocking=True) for name, tensor in next(loader).items() if name in BATCH_TENSORS}

    parquet_rate = timed(next_batch)
    peak = _peak_flops(_device_name(device), args.peak_tflops)
    per_triplet = flops_per_step / batch_size
    return {
        "mode": "compiled" if compiled else "eager",
        "batch_size": batch_size,
        "synthetic_triplets_per_s": synthetic_rate,
        "parquet_triplets_per_s": parquet_rate,
        "parquet_over_synthetic": parquet_rate / synthetic_rate,
        "synthetic_mfu": synthetic_rate * per_triplet / peak,
        "parquet_mfu": parquet_rate * per_triplet / peak,
        "gflop_per_triplet": per_triplet / 1e9,
        "step_seconds": batch_size / synthetic_rate,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base", choices=("tiny", "base", "large"), help="model size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512], help="batch sizes to measure")
    parser.add_argument(
        "--modes", nargs="+", default=["eager", "compiled"], choices=("eager", "compiled"), help="eager and/or torch.compile"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=8, help="untimed steps first (compilation, buffer fill)")
    parser.add_argument("--num-workers", type=int, default=14, help="DataLoader workers decoding the shards")
    parser.add_argument("--data", help="Parquet triplet shards (default: written from --images)")
    parser.add_argument(
        "--images", type=Path, default=ROOT.parent / "shared" / "data" / "images", help="real photos to build shards from"
    )
    parser.add_argument("--triplets", type=int, default=8192, help="triplets to write when building shards")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not an A100/H100/H200/L4")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--device", default="cuda", help="cuda; cpu only checks that the script runs (with --model tiny --peak-tflops 1)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark measures GPU training")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as directory:
        data = args.data or _write_shards(args.images, Path(directory), args.triplets)
        results = []
        for mode in args.modes:
            for batch_size in args.batch_sizes:
                result = _measure(args, batch_size, mode == "compiled", data, device)
                results.append(result)
                print(json.dumps(result), flush=True)
    report = {"device": _device_name(device), "model": args.model, "torch": torch.__version__, "results": results}
    print(f"\n{report['device']}, {args.model}, torch {torch.__version__}")
    print(f"{'mode':<10}{'batch':>6}{'synthetic/s':>13}{'parquet/s':>11}{'ratio':>7}{'MFU syn':>9}{'MFU pq':>8}")
    for r in results:
        print(
            f"{r['mode']:<10}{r['batch_size']:>6}{r['synthetic_triplets_per_s']:>13.0f}{r['parquet_triplets_per_s']:>11.0f}"
            f"{r['parquet_over_synthetic']:>7.3f}{r['synthetic_mfu']:>9.3f}{r['parquet_mfu']:>8.3f}"
        )
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
