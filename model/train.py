"""`magiclens train`: train MagicLens on triplet Parquet shards.

One process per device; under `torchrun` each process is a DDP rank (NCCL on GPUs, gloo on CPUs).
--batch-size is per process and per micro-batch, so one optimizer step sees
batch size x processes x --grad-accum triplets; the loss contrasts each query with the targets of
all processes' micro-batches.

    torchrun --nproc_per_node 8 -m magiclens train --data 'gs://bucket/triplets/*.parquet' \\
        --model base --backbone openai/clip-vit-base-patch16 --steps 20000 --batch-size 256 \\
        --output runs/base --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from magiclens.model.arguments import add_train_arguments as add_arguments  # noqa: F401 - re-exported
from magiclens.model.checkpoint import (
    LATEST_FILE,
    CheckpointError,
    build_model,
    load_checkpoint,
    load_training_state,
    point_latest,
    save_checkpoint,
)
from magiclens.model.data import DatasetError, DataPosition, TripletBatches, plan_row_groups, sum_rejects
from magiclens.model.loss import contrastive_loss
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig, to_model_input

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the inverse temperature
BATCH_TENSORS = ("query_pixels", "query_max", "input_ids", "target_pixels", "target_max", "target_hash", "query_hash")


def _setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


class TripletForward(nn.Module):
    """What DDP wraps and torch.compile compiles: uint8 pixels in, the loss's three embeddings out."""

    def __init__(self, model: MagicLens, preprocess: PreprocessConfig) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess

    def forward(
        self,
        query_pixels: torch.Tensor,
        query_max: torch.Tensor,
        input_ids: torch.Tensor,
        target_pixels: torch.Tensor,
        target_max: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        queries = to_model_input(query_pixels, query_max, self.preprocess)
        targets = to_model_input(target_pixels, target_max, self.preprocess)
        return self.model.forward_triplets(queries, input_ids, targets)


def triplet_loss(
    forward: nn.Module,
    logit_scale: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    autocast: torch.autocast,
) -> torch.Tensor:
    """The loss of one micro-batch whose BATCH_TENSORS are on the device."""
    with autocast:
        queries, targets, alone = forward(
            inputs["query_pixels"], inputs["query_max"], inputs["input_ids"], inputs["target_pixels"], inputs["target_max"]
        )
    return contrastive_loss(queries, targets, alone, inputs["target_hash"], inputs["query_hash"], logit_scale.exp())


def optimizer_for(model: MagicLens, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, with weight decay on weight matrices only (not on biases, norms, scales, the
    temperature or the pooler's query token)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_matrix = param.ndim >= 2 and not name.endswith("pooling_attn_query")
            (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine decay to zero at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_objects(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _check_replicas_agree(model: nn.Module, world_size: int) -> None:
    """DDP keeps every rank's weights identical; a difference means the ranks trained apart."""
    if world_size == 1:
        return
    checksum = torch.stack([p.detach().double().sum().cpu() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"DDP replicas diverged: weight checksums {[g.item() for g in gathered]}")


def _save(
    args: argparse.Namespace,
    model: MagicLens,
    preprocess: PreprocessConfig,
    step: int,
    training_state: dict[str, Any],
) -> Path:
    checkpoints = args.output / "checkpoints"
    directory = checkpoints / f"step-{step:08d}"
    save_checkpoint(directory, model, preprocess, step, training_state)
    point_latest(args.output, directory)
    kept = sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name)
    for old in kept[: -max(1, args.keep_checkpoints)]:
        shutil.rmtree(old)
    return directory


def _validate(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "keep_checkpoints"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_workers < 0:
        raise SystemExit("--num-workers must be 0 or more")
    if not math.exp(-MAX_LOGIT_SCALE) <= args.temperature <= 1:
        raise SystemExit("--temperature must be between 0.01 and 1")
    has_checkpoint = (args.output / LATEST_FILE).is_file()
    if args.resume and not has_checkpoint:
        raise SystemExit(f"--resume: {args.output} holds no checkpoint to continue from")
    if not args.resume and has_checkpoint:
        raise SystemExit(f"{args.output} already holds a training run: pass --resume to continue it, or another --output")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    _validate(args)
    rank, world_size, device = _setup_distributed(args.device)
    try:
        return _train(args, rank, world_size, device)
    except (DatasetError, CheckpointError) as error:
        print(f"magiclens train: {error}", file=sys.stderr)
        return 2
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _setup(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """What must not change between a run and its --resume."""
    names = ("num_workers", "batch_size", "grad_accum", "seed", "freeze_backbone", "fixed_temperature")
    return {"world_size": world_size, **{name: getattr(args, name) for name in names}}


def _train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> int:
    plan = plan_row_groups(args.data)
    torch.manual_seed(args.seed)
    setup = _setup(args, world_size)
    state: dict[str, Any] | None = None
    if args.resume:
        state = load_training_state(args.output)
        changed = [f"{k} {state['setup'].get(k)} -> {v}" for k, v in setup.items() if state["setup"].get(k) != v]
        if changed:
            raise SystemExit(f"--resume needs the setup of the run it continues; changed: {', '.join(changed)}")
        model, _, preprocess = load_checkpoint(args.output, "cpu")
        if model.config.name != args.model:
            raise SystemExit(f"--resume: {args.output} holds a {model.config.name!r} model, not {args.model!r}")
    else:
        model, preprocess = build_model(args.model, args.backbone)
        with torch.no_grad():
            model.clip.logit_scale.fill_(math.log(1.0 / args.temperature))
    model.train()
    if args.freeze_backbone:
        model.clip.requires_grad_(False)
    model.clip.logit_scale.requires_grad_(not args.fixed_temperature)
    model.to(device)

    optimizer = optimizer_for(model, args.lr, args.weight_decay)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    scheduler = _schedule(optimizer, warmup, args.steps)
    step, position = 0, DataPosition()
    if state is not None:
        step = int(state["step"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        position = DataPosition.from_dict(state["data"][rank])
        _set_rng_state(state["rng"][rank], device)

    forward: nn.Module = TripletForward(model, preprocess)
    if world_size > 1:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        forward = torch.compile(forward)

    dataset = TripletBatches(
        plan,
        model.tokenizer,
        preprocess.image_size,
        args.batch_size,
        num_workers=args.num_workers,
        rank=rank,
        world_size=world_size,
        seed=args.seed,
        buffer_size=args.shuffle_buffer,
        fixed_text_length=args.compile,
        fast_jpeg=True,
        resume=position,
    )
    batches = iter(
        DataLoader(
            dataset,
            batch_size=None,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if args.num_workers > 0 else None,
        )
    )

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.output / "tensorboard"))
    global_batch = args.batch_size * world_size * args.grad_accum
    progress = tqdm(
        total=args.steps * global_batch,
        initial=step * global_batch,
        unit="triplet",
        unit_scale=True,
        disable=rank != 0,
        file=sys.stderr,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    window_start, window_steps = time.perf_counter(), 0
    data_positions: list[dict[str, Any]] = []
    checkpoint_dir = None

    while step < args.steps:
        for micro in range(args.grad_accum):
            batch = next(batches)
            position.advance(batch)
            inputs = {name: batch[name].to(device, non_blocking=True) for name in BATCH_TENSORS}
            last_micro = micro == args.grad_accum - 1
            with contextlib.nullcontext() if last_micro or world_size == 1 else forward.no_sync():
                loss = triplet_loss(forward, model.clip.logit_scale, inputs, autocast)
                (loss / args.grad_accum).backward()
        max_norm = args.clip_grad if args.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        step += 1
        window_steps += 1
        progress.update(global_batch)

        if writer is not None and (step % args.log_every == 0 or step == args.steps):
            scalars = {
                "train/loss": loss.item(),
                "train/lr": scheduler.get_last_lr()[0],
                "train/temperature": 1.0 / model.clip.logit_scale.exp().item(),
                "train/grad_norm": grad_norm.item(),
                "train/triplets_per_s": window_steps * global_batch / (time.perf_counter() - window_start),
            }
            scalars.update({f"data/rejected_{reason}": n for reason, n in position.rejects().items()})
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(loss=f"{scalars['train/loss']:.4f}")
            window_start, window_steps = time.perf_counter(), 0

        if step % args.save_every == 0 or step == args.steps:
            data_positions = _gather_objects(position.to_dict(), world_size)
            training_state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data": data_positions,
                "rng": _gather_objects(_rng_state(device), world_size),
                "setup": setup,
            }
            if rank == 0:
                checkpoint_dir = _save(args, model, preprocess, step, training_state)
            if world_size > 1:
                dist.barrier()

    progress.close()
    _check_replicas_agree(model, world_size)
    if writer is not None:
        writer.close()
        rejected = sum_rejects(DataPosition.from_dict(d) for d in data_positions)
        print(json.dumps({"steps": step, "checkpoint": str(checkpoint_dir), "rejected": rejected}), file=sys.stderr)
    return 0
