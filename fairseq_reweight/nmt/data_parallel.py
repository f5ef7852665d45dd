"""The meta-update under data parallelism (fairseq's own distributed training): every rank replays
its own shard of each update and takes the validation loss of its share of the sentences, and the
gradients, Hessian-vector products and teacher gradient are all-reduced in flat buckets, so that
every rank applies the same teacher step (checked after each meta-update). In one process every
helper here is the identity.
"""
from typing import List

import torch
import torch.distributed as dist


def data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


BUCKET_NUMEL = 2 ** 24  # elements per collective (64 MiB in fp32): bounds the flat copy's memory


def coalesced(tensors: List[torch.Tensor], reduce, bucket_numel: int = BUCKET_NUMEL) -> None:
    """``reduce`` (an in-place collective) applied to flat copies of ``tensors``, one per dtype and
    device and per ``bucket_numel`` elements, the results copied back. One all-reduce per parameter
    tensor would pay a collective's latency once per tensor of every list a replayed step reduces,
    which can outweigh what splitting the work across ranks saves (``benchmarks/ranks.py`` times a
    meta-update per rank; figures in docs/BENCHMARKS.md). fairseq's legacy_ddp flattens its gradients
    the same way."""
    buckets, open_buckets = [], {}  # open_buckets: (dtype, device) -> (bucket, its numel)
    for tensor in tensors:
        key = (tensor.dtype, tensor.device)
        bucket, numel = open_buckets.get(key, (None, 0))
        if bucket is None or (bucket and numel + tensor.numel() > bucket_numel):
            bucket, numel = [], 0
            buckets.append(bucket)
        bucket.append(tensor)
        open_buckets[key] = (bucket, numel + tensor.numel())
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        reduce(flat)
        for tensor, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
            tensor.copy_(piece.view_as(tensor))


def all_reduce_fn():
    """The core's ``all_reduce`` under data parallelism (sums in place), else None."""
    if not data_parallel():
        return None
    return lambda tensors: coalesced(list(tensors), dist.all_reduce)


def summed_over_ranks(value: float, device) -> float:
    """``value`` summed over the ranks (in float64), e.g. an update's sample size from each rank's
    micro-batches; ``value`` itself in one process."""
    if not data_parallel():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def rank_share(rows: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``rows`` (rows rank, rank + N, ... of N ranks): every rank holds the
    same validation batch and takes the loss of its own sentences; all of ``rows`` in one process."""
    if not data_parallel():
        return rows
    return rows[dist.get_rank()::dist.get_world_size()]


def check_in_sync(module: torch.nn.Module) -> None:
    """Under data parallelism every rank applies the same all-reduced teacher gradient; check that
    the teachers are still identical (one all-reduce of a few numbers)."""
    if not data_parallel():
        return
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the teacher differs between data-parallel ranks after a meta-update")
