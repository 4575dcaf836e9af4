"""One vLLM engine per rank in a multi-rank (torchrun / DeepSpeed) process, each in vLLM's own
torch.distributed world of size 1 beside the trainer's process group.

Every rank runs an independent engine, tensor parallel 1, generating its own prompt groups. vLLM builds its process groups (world, TP, PP, DP...) on
``torch.distributed``'s *default* group; on the trainer's N-rank group it would make every rank's engine
a member of one N-rank vLLM world (collective start-up, clashing shared-memory names). So every call
into vLLM runs inside vLLM's own torch.distributed world (:class:`VLLMWorld`): c10d's state (default
group, group registry, group-name counter) is swapped for a private one, where vLLM creates a world of
size 1 on a private file store (``file:///tmp/vllm_dist_<uuid>``, no port) and its size-1 groups, then
swapped back. The trainer's group is never touched and its registry never sees vLLM's groups, so
DeepSpeed's collectives (gloo / NCCL) work as before, group names stay equal across ranks, and the
order does not matter (an engine built before ``init_distributed`` leaves no default group behind).
Engines need no communication between ranks at all: they may be built, and generate, at different
times on different ranks. The engine runs on this rank's device (``torch.cuda.current_device()``,
which the trainer sets from ``LOCAL_RANK``) through a one-process executor
(:func:`rank_local_executor`); vLLM's default one would put every rank on GPU 0. Weight sync is per
rank: every rank walks the ZeRO-3 buckets and feeds the gathered tensors into its own engine; each
bucket is produced in the trainer's world (the gathers are its collectives) and consumed in vLLM's
(:meth:`VLLMWorld.feed`). A multi-rank process is recognised by an initialised world of more than one
rank, or, before initialisation, by the launcher's ``WORLD_SIZE`` > 1. The swap relies on c10d
internals (``distributed_c10d._world``, ``_process_group_name``; torch 2.13) and is not thread-safe:
no other thread may use torch.distributed while vLLM runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch


class VLLMWorld:
    """torch.distributed state of vLLM's own world (size 1) in a multi-rank process, beside the trainer's.

    c10d keeps its state — the default group, the registry of groups (ranks, backends, names) and the
    counter that names new groups — in one object, ``distributed_c10d._world``, that may be replaced by
    one with the same fields (the override torch's multi-threaded test process groups use). Inside
    :meth:`active` this object is vLLM's: there vLLM finds no default group on its first engine and creates
    its own (world size 1, on a private file store, no port), then its TP/PP/DP... groups, all registered
    here and not in the trainer's registry, so the trainer's group names (hence its store keys) stay the
    same on every rank whether or when a rank built an engine. Group names get a ``vllm_`` prefix: the
    C++ registry of names is process-wide and refuses a name twice.
    """

    def __init__(self) -> None:
        from torch.distributed import distributed_c10d as c10d

        class _State(c10d._World):
            pg_map = pg_names = pg_group_ranks = pg_backend_config = tags_to_pg = pg_to_tag = None
            group_count = 0  # plain attributes of this object, shadowing _World's module-global properties

        state = _State()
        state.pg_map, state.pg_names, state.pg_group_ranks, state.pg_backend_config = {}, {}, {}, {}
        state.tags_to_pg, state.pg_to_tag = {}, {}
        self.state = state
        self.outer: Any = None  # the world active() swapped out (the trainer's), while inside it

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within: torch.distributed is vLLM's world; on exit whatever was there before (the trainer's)."""
        from torch.distributed import distributed_c10d as c10d

        if c10d._world is self.state:  # nested (an engine method calling another)
            yield
            return
        outer = (c10d._world, c10d._process_group_name)
        name = outer[1]
        self.outer = outer
        _install(
            self.state, lambda ranks, use_hashed_name: c10d.GroupName("vllm_" + name(ranks, use_hashed_name))
        )
        try:
            yield
        finally:
            _install(*outer)
            self.outer = None

    def feed(self, stream: Iterable[Any]) -> Iterator[Any]:
        """``stream``'s items for vLLM to consume inside :meth:`active`, each produced in the world outside
        it (the trainer's): the ZeRO-3 gathers behind a weight stream are the trainer group's collectives."""
        from torch.distributed import distributed_c10d as c10d

        items = iter(stream)
        while True:
            inner, outer = (c10d._world, c10d._process_group_name), self.outer
            if outer is not None:
                _install(*outer)
            try:
                item = next(items, _END)
            finally:
                if outer is not None:
                    _install(*inner)
            if item is _END:
                return
            yield item


_END = object()
_vllm_world: VLLMWorld | None = None


def _install(world: Any, name_groups: Any) -> None:
    """Make ``world`` c10d's state and ``name_groups`` its group-naming function (as ``_update_default_pg``
    would, the C++ side learns the default group's rank)."""
    from torch.distributed import distributed_c10d as c10d

    c10d._world, c10d._process_group_name = world, name_groups
    default = world.default_pg
    torch._C._distributed_c10d._set_global_rank(default.rank() if default is not None else -1)


def in_multirank_world() -> bool:
    """Whether this process is one rank of several: an initialised torch.distributed world of more than one
    rank, or (not initialised yet) a launcher's ``WORLD_SIZE`` > 1 (torchrun, deepspeed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def own_vllm_world() -> VLLMWorld:
    """This process's :class:`VLLMWorld`, shared by its engines (vLLM's parallel state is process-wide)."""
    global _vllm_world
    if _vllm_world is None:
        _vllm_world = VLLMWorld()
    return _vllm_world


@cache
def rank_local_executor() -> type:
    """vLLM's one-process executor, on this rank's device: ``UniProcExecutor`` takes the local rank from
    the device string (plain ``cuda``: GPU 0 on every rank); this one uses ``torch.cuda.current_device()``."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    class RankLocalExecutor(UniProcExecutor):
        def _distributed_args(self) -> tuple[str, int, int]:
            init_method, rank, local_rank = super()._distributed_args()
            if torch.cuda.is_available():
                local_rank = torch.cuda.current_device()
            return init_method, rank, local_rank

    return RankLocalExecutor
