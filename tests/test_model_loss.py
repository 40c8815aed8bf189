"""The contrastive loss: in-batch targets, the query image as hard negative, duplicates, and DDP."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from magiclens.model.loss import contrastive_loss


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _reference(queries, targets, alone, target_hashes, query_hashes, scale):
    """Row by row, written out: candidates are the row's target, every target whose image differs
    from it, and the query image alone unless it is the target image."""
    losses = []
    for i in range(queries.shape[0]):
        logits = [scale * queries[i] @ targets[i]]
        for j in range(targets.shape[0]):
            if j != i and target_hashes[j] != target_hashes[i]:
                logits.append(scale * queries[i] @ targets[j])
        if query_hashes[i] != target_hashes[i]:
            logits.append(scale * queries[i] @ alone[i])
        losses.append(-torch.log_softmax(torch.stack(logits), dim=0)[0])
    return torch.stack(losses).mean()


def _batch(seed: int, size: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return [_unit(torch.randn(size, 16, generator=generator)) for _ in range(3)]


def test_loss_matches_the_written_out_definition() -> None:
    queries, targets, alone = _batch(0)
    target_hashes = torch.tensor([10, 11, 12, 13, 14, 15])
    query_hashes = torch.tensor([20, 21, 22, 23, 24, 25])
    scale = torch.tensor(1 / 0.07)
    loss = contrastive_loss(queries, targets, alone, target_hashes, query_hashes, scale)
    torch.testing.assert_close(loss, _reference(queries, targets, alone, target_hashes, query_hashes, scale))


def test_the_same_target_image_twice_is_not_a_negative() -> None:
    queries, targets, alone = _batch(1)
    targets[3] = targets[1]  # rows 1 and 3 have the same target image
    duplicated = torch.tensor([10, 11, 12, 11, 14, 15])
    distinct = torch.tensor([10, 11, 12, 13, 14, 15])
    query_hashes = torch.tensor([20, 21, 22, 23, 24, 25])
    scale = torch.tensor(10.0)
    with_duplicates = contrastive_loss(queries, targets, alone, duplicated, query_hashes, scale)
    torch.testing.assert_close(with_duplicates, _reference(queries, targets, alone, duplicated, query_hashes, scale))
    # without the hash, row 1 would be pushed away from its own answer
    assert contrastive_loss(queries, targets, alone, distinct, query_hashes, scale) > with_duplicates


def test_the_query_image_is_a_hard_negative_unless_it_is_the_target() -> None:
    queries, targets, alone = _batch(2, size=1)
    scale = torch.tensor(10.0)
    only_positive = contrastive_loss(queries, targets, alone, torch.tensor([1]), torch.tensor([1]), scale)
    assert only_positive.item() == 0.0  # one candidate left: the target itself
    with_hard_negative = contrastive_loss(queries, targets, alone, torch.tensor([1]), torch.tensor([2]), scale)
    expected = -torch.log_softmax(scale * torch.stack([queries[0] @ targets[0], queries[0] @ alone[0]]), 0)[0]
    torch.testing.assert_close(with_hard_negative, expected)


def _distributed_worker(rank: int, world_size: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size)
    queries, targets, alone, target_hashes, query_hashes = torch.load(f"{directory}/inputs.pt")
    rows = slice(rank * 4, (rank + 1) * 4)
    mine = [t[rows].clone().requires_grad_(True) for t in (queries, targets, alone)]
    loss = contrastive_loss(*mine, target_hashes[rows], query_hashes[rows], torch.tensor(1 / 0.07))
    loss.backward()
    torch.save([loss.detach()] + [t.grad for t in mine], f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()


def test_under_ddp_every_rank_contrasts_with_the_global_batch(tmp_path: Path) -> None:
    """Two gloo processes with 4 rows each give the loss and the gradients of one batch of 8
    (after DDP's averaging of gradients over ranks)."""
    world_size = 2
    queries, targets, alone = _batch(3, size=8)
    target_hashes = torch.tensor([1, 2, 3, 4, 5, 2, 7, 8])  # a duplicate across the two ranks
    query_hashes = torch.tensor([11, 12, 13, 4, 15, 16, 17, 18])  # row 3's query is its target
    torch.save([queries, targets, alone, target_hashes, query_hashes], tmp_path / "inputs.pt")
    mp.spawn(_distributed_worker, args=(world_size, str(tmp_path)), nprocs=world_size, join=True)

    leaves = [t.clone().requires_grad_(True) for t in (queries, targets, alone)]
    reference = contrastive_loss(*leaves, target_hashes, query_hashes, torch.tensor(1 / 0.07))
    reference.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    torch.testing.assert_close(sum(r[0] for r in results) / world_size, reference.detach())
    for which in range(3):
        gathered = torch.cat([r[1 + which] for r in results]) / world_size
        torch.testing.assert_close(gathered, leaves[which].grad, atol=1e-6, rtol=1e-5)
    assert not math.isnan(reference.item())
