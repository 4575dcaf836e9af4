"""Training backends: plain torch (one process) and DeepSpeed ZeRO-3 (torchrun / deepspeed launcher).

A backend owns the trained module and its optimizer and offers the three things the update loop needs:
``backward(loss, boundary)``, ``step() -> (grad_norm, stepped)`` and the parameters to sync into the
rollout engine. A step whose gradient norm is not finite is skipped and leaves the weights and the
optimizer state untouched (counted by the caller).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from spear_engine.train.master_weights import MasterWeights, needs_master_weights


class Backend(Protocol):
    module: torch.nn.Module
    device: torch.device
    """Where the module's parameters (and so the batches and the loss) live."""
    rank: int
    world_size: int

    def forward(self, *args: Any) -> Any: ...

    def backward(self, loss: torch.Tensor, boundary: bool) -> None: ...

    def barrier(self) -> None: ...

    def step(self) -> tuple[float, bool]: ...

    def discard_gradients(self) -> None: ...

    def reset_optimizer_state(self) -> None: ...

    @property
    def hf_model(self) -> torch.nn.Module:
        """The Hugging Face model (what weight sync and saving read)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What goes into the checkpoint's state (model and optimizer for plain torch): tensors and plain data."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def write_extra(self, folder: Path) -> None:
        """Files of the backend's own checkpoint format (the ZeRO-3 shards) into a checkpoint folder."""
        ...

    def read_extra(self, folder: Path) -> None: ...


def _hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a FusedHeadPolicy wrapper (or the module itself)."""
    return getattr(module, "model", module)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, fused (one vectorised pass over each tensor) where torch has that kernel for these
    parameters (floating point, on CPU or CUDA): on the 2-core CPU a step over SmolLM2-135M's 135M
    parameters is 3-5x faster fused than torch's default per-tensor loop there (bench/bench_optimizer_step.py).
    Same update rule; the results differ from the loop's by float rounding only."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused and params else None)


class TorchBackend:
    """One process, torch AdamW, gradient clipping, skip of non-finite steps; fp32 master weights for a
    bf16/fp16 module."""

    def __init__(self, module: torch.nn.Module, lr: float, weight_decay: float, grad_clip: float,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.rank, self.world_size = 0, 1
        self.params = [p for p in module.parameters() if p.requires_grad]
        # a bf16/fp16 module: the optimizer steps fp32 copies (spear_engine.train.master_weights)
        self.master = MasterWeights(self.params) if needs_master_weights(self.params) else None
        self.optimizer = adamw(self.master.masters if self.master else self.params, lr, weight_decay)
        self.grad_clip = grad_clip

    def forward(self, *args: Any) -> Any:
        return self.module(*args)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        del boundary
        loss.backward()

    def barrier(self) -> None:
        """One process: nothing to wait for."""

    def step(self) -> tuple[float, bool]:
        stepped = self.master.masters if self.master else self.params
        norm = float(torch.nn.utils.clip_grad_norm_(stepped, self.grad_clip))
        ok = math.isfinite(norm)
        if ok:
            self.optimizer.step()
            if self.master:
                self.master.publish()
        self.discard_gradients()
        return norm, ok

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            self.master.zero_grad()

    def reset_optimizer_state(self) -> None:
        """Forget the Adam moments (they re-initialise at the next step)."""
        self.optimizer.state.clear()

    @property
    def hf_model(self) -> torch.nn.Module:
        return _hf_model(self.module)

    def state_dict(self) -> dict[str, Any]:
        """The model's weights (the fp32 master copies where the module is bf16/fp16) and the optimizer."""
        model = self.master.full_precision_state(self.hf_model) if self.master else self.hf_model.state_dict()
        return {"model": model, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_weights(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the model's weights (any dtype; the fp32 master copies too, so the next step starts from them)."""
        self.hf_model.load_state_dict(weights)
        if self.master:
            self.master.load_full_precision(self.hf_model, weights)

    def write_extra(self, folder: Path) -> None:
        del folder  # everything is in the checkpoint's state files

    def read_extra(self, folder: Path) -> None:
        del folder


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: ``auto`` = this rank's GPU (``LOCAL_RANK``) when CUDA is available, else CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda, but torch sees no CUDA device (a CPU build of torch, or no GPU); "
                         "use trainer.device=auto or cpu")  # fmt: skip
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed_from_env(backend: str | None = None) -> tuple[int, int]:
    """(rank, world_size); initialises torch.distributed from the launcher's env (gloo on CPU, nccl on GPU).

    A single process without launcher variables gets world size 1 with a local rendezvous, as DeepSpeed
    otherwise falls back to MPI discovery.
    """
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    else:  # a group made by someone else (a notebook, an earlier run in this process): DeepSpeed still reads these
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size()


class DeepSpeedBackend:
    """DeepSpeed ZeRO-3 (partitioned parameters, gradients and optimizer state), gloo on CPU."""

    def __init__(
        self,
        module: torch.nn.Module,
        lr: float,
        weight_decay: float,
        grad_clip: float,
        offload: bool = False,
        bf16: bool = False,
    ) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        if torch.cuda.is_available():  # NCCL needs each rank on its own GPU before the group exists
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

        self.rank, self.world_size = init_distributed_from_env()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if offload:
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            config["zero_optimization"]["offload_param"] = {"device": "cpu"}
        head = getattr(module, "lm_head", None)
        if head is not None:  # the fused head reads lm_head.weight outside lm_head.forward
            deepspeed.zero.register_external_parameter(module, head.weight)
        optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self.device = torch.device(self.engine.device)

    def forward(self, *args: Any) -> Any:
        return self.engine(*args)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def barrier(self) -> None:
        dist.barrier()

    def step(self) -> tuple[float, bool]:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, math.isfinite(norm)

    def discard_gradients(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)

    def reset_optimizer_state(self) -> None:
        """Forget the Adam moments of the wrapped torch optimizer (over this rank's fp32 partitions)."""
        self.engine.optimizer.optimizer.state.clear()

    @property
    def hf_model(self) -> torch.nn.Module:
        return _hf_model(self.module)

    def state_dict(self) -> dict[str, Any]:
        return {}  # partitioned model and optimizer state live in the ZeRO shards (write_extra)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def write_extra(self, folder: Path) -> None:
        """Every rank writes its ZeRO-3 shard (a collective), into the same temporary folder."""
        self.engine.save_checkpoint(str(folder / "zero"), tag="shards", client_state={})

    def read_extra(self, folder: Path) -> None:
        """Load this rank's ZeRO-3 shards, weights-only. DeepSpeed's own loader unpickles them with
        ``torch.load(weights_only=False)``; for this call its checkpoint engine's ``load`` (through which the
        ZeRO-3 load reads every file) is replaced by :func:`safe_torch_load` allowing only the two DeepSpeed types
        the shards hold, and ``torch.load`` is forced weights-only in case a DeepSpeed path reads a file directly.
        A shard that pickles anything else raises ``CheckpointError`` before any of it runs."""
        from spear_engine.train.checkpoint import CheckpointError, safe_torch_load

        allowed = _zero_shard_globals()
        checkpoint_engine = self.engine.checkpoint_engine
        checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, allowed, map_location)
        try:
            with torch.serialization.safe_globals(allowed), _forced_weights_only_load():
                self.engine.load_checkpoint(str(folder / "zero"), tag="shards")
        except pickle.UnpicklingError as err:  # a direct torch.load of DeepSpeed's, refused by the forced mode
            raise CheckpointError(f"checkpoint {folder}: a ZeRO-3 shard holds objects other than tensors and plain "
                                  f"data ({str(err).splitlines()[0]}); it is refused, nothing in it was run") from None  # fmt: skip
        finally:
            del checkpoint_engine.load  # the class's own method again


def _zero_shard_globals() -> list[Any]:
    """The only non-builtin types DeepSpeed's ZeRO-3 shards pickle (0.19, fp32 and bf16, listed by
    ``torch.serialization.get_unsafe_globals_in_checkpoint``); the rest is tensors and plain data."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


@contextmanager
def _forced_weights_only_load() -> Iterator[None]:
    """Every ``torch.load`` in the block runs weights-only, even one that asks for ``weights_only=False``."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
