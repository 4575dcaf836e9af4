"""``ResilientEngine``: a rollout engine that survives its engine dying and retries weight syncs.

A rollout engine that holds its own copy of the weights (vLLM, or HF beside a DeepSpeed backend) can
die mid-run (an out-of-memory kill of a worker, a crashed engine core) or fail a weight sync. The
wrapper gives the trainer one contract:

* ``generate``: on an exception from the engine, close it, build a fresh one with ``factory``, push
  the *current* training weights into it (``sync_source()``) and retry the call once. A second
  failure raises :class:`EngineFailure`. Errors that say the request itself is wrong
  (``ValueError``, ``TypeError``: a prompt too long, an empty prompt) are not retried: a new engine
  would refuse it too.
* ``load_weights``: on an exception, retry with a fresh stream of weights from ``sync_source()``, up
  to ``sync_attempts`` attempts in all; then raise :class:`WeightSyncError`. The engine would
  otherwise sample from stale (or half-updated) weights, which silently corrupts training.

Counts for the metrics: ``restarts``, ``sync_retries`` (see :meth:`metrics`).

Only for one process: with several ranks the weight gathers of a ZeRO-3 sync are collectives, so a
retry on one rank alone would wait for the others forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from spear_engine.rollout.engine import Generation, RolloutEngine, SamplingParams

_log = logging.getLogger(__name__)
NamedTensors = Iterable[tuple[str, torch.Tensor]]


class EngineFailure(RuntimeError):
    """The rollout engine failed again after being restarted."""


class WeightSyncError(RuntimeError):
    """Pushing the trained weights into the rollout engine failed on every attempt."""


class ResilientEngine:
    """Wraps the engine built by ``factory``; see the module docstring."""

    def __init__(
        self,
        factory: Callable[[], RolloutEngine],
        sync_source: Callable[[], NamedTensors] | None = None,
        sync_attempts: int = 3,
        retry_delay_s: float = 1.0,
        request_errors: tuple[type[BaseException], ...] = (ValueError, TypeError),
    ) -> None:
        if sync_attempts < 1:
            raise ValueError(f"sync_attempts must be at least 1, got {sync_attempts}")
        self.factory = factory
        self.sync_source = sync_source
        self.sync_attempts = sync_attempts
        self.retry_delay_s = retry_delay_s
        self.request_errors = request_errors
        self.engine = factory()
        self.name = getattr(self.engine, "name", type(self.engine).__name__)
        self.restarts = 0
        self.sync_retries = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        try:
            return self.engine.generate(prompts, params)
        except self.request_errors:
            raise
        except Exception as err:
            _log.warning("rollout engine %s failed (%r); restarting it and retrying once", self.name, err)
            first = err
        self.restart()
        try:
            return self.engine.generate(prompts, params)
        except Exception as err:
            raise EngineFailure(
                f"the rollout engine {self.name!r} failed ({first!r}), was restarted and re-synced, and failed "
                f"again ({err!r}). Check its memory settings (rollout.*), or run with rollout.name=hf."
            ) from err

    def restart(self) -> None:
        """Close the engine, build a fresh one and push the current weights into it."""
        try:
            self.engine.close()
        except Exception as err:  # a dead engine may not close cleanly; the new one matters
            _log.warning("closing the failed rollout engine raised %r", err)
        self.engine = self.factory()
        self.restarts += 1
        if self.sync_source is not None:
            self.load_weights(self.sync_source())

    def load_weights(self, named_tensors: NamedTensors) -> None:
        errors: list[BaseException] = []
        for attempt in range(self.sync_attempts):
            if attempt:
                if self.sync_source is None:
                    break
                self.sync_retries += 1
                time.sleep(self.retry_delay_s)
                named_tensors = self.sync_source()
            try:
                self.engine.load_weights(named_tensors)
                return
            except Exception as err:
                errors.append(err)
                _log.warning("weight sync to rollout engine %s failed (attempt %d of %d): %r", self.name,
                             attempt + 1, self.sync_attempts, err)  # fmt: skip
        raise WeightSyncError(
            f"pushing the trained weights into the rollout engine {self.name!r} failed {len(errors)} time(s); "
            f"last error: {errors[-1]!r}. Training stops rather than sample from stale weights; the last "
            f"checkpoint is intact, rerun the same command to resume."
        ) from errors[-1]

    def metrics(self) -> dict[str, float]:
        return {"rollout/engine_restarts": float(self.restarts), "rollout/weight_sync_retries": float(self.sync_retries)}

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name: str) -> Any:  # engine-specific extras (e.g. VLLMEngine.worker_model)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)
