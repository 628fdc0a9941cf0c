"""The few collective operations the method needs; no-ops on a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 0, in rank order (no gradient flows back)."""
    if world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across ranks (MoCo's shuffle-BN); return this rank's part and the
    permutation's inverse needed by `batch_unshuffle`. On one process it shuffles locally, which only
    matters together with split-batch BN."""
    local = x.shape[0]
    gathered = concat_all_gather(x)
    permutation = torch.randperm(gathered.shape[0], device=x.device)
    if world_size() > 1:
        dist.broadcast(permutation, src=0)  # every rank must apply the same permutation
    inverse = torch.argsort(permutation)
    mine = permutation.view(world_size(), local)[rank()]
    return gathered[mine], inverse


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    local = x.shape[0]
    gathered = concat_all_gather(x)
    return gathered[inverse.view(world_size(), local)[rank()]]


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if `flag` is true on every rank (a collective: all ranks call it). A decision that
    skips a collective (such as not taking a step) must be the same on all ranks, or the others hang."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
