"""Parameter initialisation that gives the same model on every mesh.

Drawing a sharded parameter from the global RNG makes its values depend on which rank draws
which shard, so one seed gives a different initial model on one process, FSDP, TP, EP or PP.
Inside `seeded_init(module, seed)` every draw is keyed instead by (seed, parameter name,
chunk): the full tensor is cut along dim 0 into chunks whose size depends only on its global
shape, each chunk comes from its own generator, and a rank draws only the chunks that overlap
its shard and keeps its slice. Every mesh (and one process) therefore holds slices of the
same full tensor; a rank pays for the rows of its shard (whole rows when a shard splits
columns), never for the full tensor.

Outside that scope the functions fall back to `torch.nn.init` and the global RNG (unit tests
that initialise a single module on its own).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
# Public since torch 2.x as a private helper only: maps (global shape, mesh, placements) to this
# rank's shard shape and offset, strided (FSDP over TP/EP) shards included; 2.11 - 2.13 agree.
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# About 4 MiB of fp32 per chunk: small enough that a rank with a one-row shard draws little,
# large enough that a 201088 x 2880 table is only ~550 generators.
_CHUNK_NUMEL = 1 << 20
# Wrappers (torch.compile, activation checkpointing) insert these into parameter names.
_WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

Fill = Callable[[torch.Tensor, torch.Generator | None], object]


@dataclass(frozen=True)
class _Scope:
    seed: int
    names: dict[int, str]  # id(parameter) -> canonical name


_scope: ContextVar[_Scope | None] = ContextVar("runtime_model_seeded_init", default=None)


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper segments: the same on every mesh and wrapping."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


@contextlib.contextmanager
def seeded_init(module: nn.Module, seed: int) -> Iterator[None]:
    """Key every draw of `module`'s parameters by (seed, name, chunk) while the scope is open."""
    names = {id(p): canonical_name(n) for n, p in module.named_parameters()}
    token = _scope.set(_Scope(seed, names))
    try:
        yield
    finally:
        _scope.reset(token)


def normal_(param: torch.Tensor, std: float, mean: float = 0.0) -> None:
    _draw(param, lambda t, g: nn.init.normal_(t, mean=mean, std=std, generator=g))


def trunc_normal_(param: torch.Tensor, std: float, mean: float = 0.0) -> None:
    # nn.init's default cut-off is +-2 in absolute units (not in stds), kept as it always was.
    _draw(param, lambda t, g: nn.init.trunc_normal_(t, mean=mean, std=std, generator=g))


def uniform_(param: torch.Tensor, bound: float) -> None:
    """U(-bound, bound) (LoRA's A: Kaiming-uniform with a = sqrt(5) is bound 1/sqrt(fan_in))."""
    _draw(param, lambda t, g: nn.init.uniform_(t, -bound, bound, generator=g))


def zeros_(param: torch.Tensor) -> None:
    nn.init.zeros_(param)  # deterministic: no RNG, every shard alike


def ones_(param: torch.Tensor) -> None:
    nn.init.ones_(param)


@torch.no_grad()
def _draw(param: torch.Tensor, fill: Fill) -> None:
    scope = _scope.get()
    if scope is None:
        fill(param, None)
        return
    name = scope.names.get(id(param))
    if name is None:
        raise RuntimeError("seeded_init: a parameter outside the initialised module was drawn")
    local, offset = _local_shard(param)
    if local.numel() == 0:  # uneven sharding can leave a rank without rows
        return
    if isinstance(local, FakeTensor):
        # The dry run (runtime/dry_run.py): shapes without values, nothing to draw (and a
        # fake CUDA device has no generator); the shard and its offset were still checked.
        return
    columns = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    _fill_rows(local, tuple(param.shape), offset[0], columns, name, scope.seed, fill)


def _local_shard(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's tensor of `param` and its offset in the full tensor (zeros if unsharded)."""
    if not isinstance(param, DTensor):
        return param, (0,) * param.dim()
    local = param.to_local()  # no_grad: the parameter's own storage
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"seeded_init: shard shape {tuple(local.shape)} != expected {shape}")
    return local, tuple(offset)


def _fill_rows(out: torch.Tensor, shape: tuple[int, ...], first: int, columns: tuple[slice, ...],
               name: str, seed: int, fill: Fill) -> None:
    """out[:] = full[first:first + len(out)][:, *columns], chunk by chunk along dim 0."""
    count, device = out.shape[0], out.device
    whole_rows = all(c.start == 0 and c.stop == n for c, n in zip(columns, shape[1:]))
    rows_per_chunk = max(1, _CHUNK_NUMEL // max(1, math.prod(shape[1:])))
    for chunk in range(first // rows_per_chunk, -(-(first + count) // rows_per_chunk)):
        start = chunk * rows_per_chunk
        stop = min(start + rows_per_chunk, shape[0])
        lo, hi = max(first, start), min(first + count, stop)  # rows of this chunk we hold
        generator = torch.Generator(device=device)
        generator.manual_seed(_chunk_seed(seed, name, chunk))
        if whole_rows and (lo, hi) == (start, stop) and out.dtype == torch.float32:
            fill(out[lo - first:hi - first], generator)  # the chunk is ours: draw in place
            continue
        values = torch.empty((stop - start, *shape[1:]), dtype=torch.float32, device=device)
        fill(values, generator)
        out[lo - first:hi - first].copy_(values[(slice(lo - start, hi - start),) + columns])


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
