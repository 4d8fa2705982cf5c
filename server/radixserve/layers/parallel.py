"""Tensor-parallel state: this process's rank, the world size, and the collectives layers use.

One engine process per rank. Tensor collectives (all-reduce, all-gather) run on the default
group: NCCL on CUDA, gloo on the CPU. Control messages (the batch description rank 0 sends
each step) run on a gloo group over CPU tensors, so they never wait on a GPU stream. With
one rank nothing is initialised and every helper returns at once.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_rank = 0
_size = 1
_cpu_group: dist.ProcessGroup | None = None


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n items split into `parts` contiguous parts whose
    sizes differ by at most one (the first n % parts parts get the extra item)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def init_tensor_parallel(
    rank: int, size: int, init_addr: str, device: str, timeout_s: float
) -> None:
    """Join the group; every rank calls this with the same `size` and `init_addr`.

    `timeout_s` bounds every collective, so a rank whose peer died raises instead of hanging.
    """
    global _rank, _size, _cpu_group
    _rank, _size = rank, size
    if size == 1:
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=f"tcp://{init_addr}", rank=rank, world_size=size, timeout=timeout
    )
    _cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None


def destroy_tensor_parallel() -> None:
    global _rank, _size, _cpu_group
    if _size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _rank, _size, _cpu_group = 0, 1, None


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    if _size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate each rank's [..., sizes[r]] slice along the last dimension.

    Ranks may hold uneven slices (a vocabulary that does not divide); collectives need equal
    shapes, so each pads to the largest and the padding is cut after the gather.
    """
    if _size == 1:
        return x
    width = max(sizes)
    if x.shape[-1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


def broadcast_cpu(x: torch.Tensor) -> torch.Tensor:
    """Send a CPU tensor from rank 0 to every rank (in place on the receivers)."""
    if _size > 1:
        dist.broadcast(x, src=0, group=_cpu_group)
    return x


def all_reduce_min_cpu(value: int) -> int:
    """The smallest of one integer across ranks (e.g. the KV tokens every rank can hold)."""
    if _size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_cpu_group)
    return int(t.item())


def shard_heads(num_heads: int, num_kv_heads: int, size: int, rank: int) -> tuple[range, range]:
    """(query heads, KV heads) of `rank`; ValueError saying why when `size` ranks cannot split.

    A rank must hold whole GQA groups, or a whole group's KV head, so that its queries and
    keys line up as they do in the full model:
    - at least as many KV heads as ranks: KV heads (each with its group of query heads) are
      dealt out in contiguous runs that differ by at most one, so 3 KV heads on 2 ranks
      are 2 + 1 and a model with 9 heads / 3 KV heads runs at any size up to 3;
    - fewer KV heads than ranks: each KV head is replicated on size / num_kv_heads ranks,
      which share its query heads (again as evenly as possible), so `size` must be a
      multiple of num_kv_heads and at most num_heads.
    """
    if size > num_heads:
        raise ValueError(
            f"--tp-size {size} is more than the model's {num_heads} attention heads: "
            "every rank needs at least one head"
        )
    group = num_heads // num_kv_heads
    if num_kv_heads >= size:
        kv_start, kv_end = split_range(num_kv_heads, size, rank)
        return range(kv_start * group, kv_end * group), range(kv_start, kv_end)
    if size % num_kv_heads:
        raise ValueError(
            f"--tp-size {size} does not fit the model's {num_kv_heads} KV heads: with fewer "
            f"KV heads than ranks, the ranks must be a multiple of {num_kv_heads} so that "
            "each KV head is replicated on the same number of ranks"
        )
    per_kv = size // num_kv_heads
    kv = rank // per_kv
    q_start, q_end = split_range(group, per_kv, rank % per_kv)
    return range(kv * group + q_start, kv * group + q_end), range(kv, kv + 1)


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Send a tensor on the model's device from rank 0 to every rank (NCCL on CUDA)."""
    if _size > 1:
        dist.broadcast(x, src=0)
    return x
