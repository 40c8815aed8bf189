"""The MagicLens training loss: InfoNCE from each query to every target in the (global) batch.

Row i's positive is target i. Its negatives are all other targets of the batch (gathered from every
rank under DDP) and, as an extra hard negative, its own query image with the empty instruction, so
that the model cannot ignore the instruction. Two rows whose targets are the same image (same
content hash) would otherwise push a query away from its own correct answer, so a target with the
same hash as row i's target is not a negative of row i; likewise the hard negative is dropped when
the query image is the target image.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_single


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x stacked in rank order; gradients flow back (summed) to the rank that made each part."""
    return all_gather_single(x, 0, dist.group.WORLD)


def contrastive_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    query_images_alone: torch.Tensor,
    target_hashes: torch.Tensor,
    query_hashes: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy over this rank's rows.

    queries, targets, query_images_alone: (B, D) L2-normalised embeddings of this rank's rows.
    target_hashes, query_hashes: (B,) int64 content hashes of the target and query images.
    logit_scale: scalar, the inverse temperature (already exponentiated).
    Under torch.distributed the targets of all ranks are the candidates; averaging this loss over
    ranks (as DDP averages gradients) gives the loss of the global batch.
    """
    batch = queries.shape[0]
    offset = 0
    all_targets, all_target_hashes = targets, target_hashes
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * batch
        all_targets = _gather(targets)
        all_target_hashes = _gather(target_hashes)

    positives = torch.arange(batch, device=queries.device) + offset
    logits = logit_scale * queries @ all_targets.T  # (B, global B)
    same_image = target_hashes[:, None] == all_target_hashes[None, :]
    same_image[torch.arange(batch, device=queries.device), positives] = False
    logits = logits.masked_fill(same_image, float("-inf"))

    hard = logit_scale * (queries * query_images_alone).sum(dim=-1, keepdim=True)  # (B, 1)
    hard = hard.masked_fill((query_hashes == target_hashes)[:, None], float("-inf"))
    return F.cross_entropy(torch.cat([logits, hard], dim=1), positives)
