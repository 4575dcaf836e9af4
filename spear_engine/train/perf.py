"""Throughput you can read: real vs processed tokens of the trainer's passes, model FLOPs, and MFU against the
machine's own GEMM rate measured once per process.

* ``perf/real_tokens``: tokens the trainer's passes ran that are real (attention 1), forward-only passes
  (old / reference log-probs) and training passes (forward + backward) together.
* ``perf/padding_efficiency``: real / processed tokens the model body ran (processed = rows x padded width;
  packed rows: the real tokens, 1.0).
* ``perf/prefix_sharing``: real tokens of the rows / real tokens the body ran (> 1 when a prefix several rows
  share ran once, ``actor.share_prefixes``).
* ``perf/model_flops``: 6·P per trained token + 2·P per forward-only token + 2·P per generated token, where a
  token's P is the body's parameters (all but the embedding and the head) for every real token the body
  ran (a shared prefix once: the FLOPs done, not those of the rows one by one) plus the head's for the
  positions that predict a response token (the fused policy runs the head only there).
* ``perf/mfu``: model FLOPs of the step / (step time x the GEMM rate); ``perf/update_mfu``: the training
  passes' 6·P per token / (update time x the GEMM rate). The rate is a square GEMM of the model's dtype on
  its device, timed at start-up (``perf/gemm_tflops``), so the ratio reads the same on any machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cache

import torch


def flop_params(model: torch.nn.Module) -> tuple[int, int]:
    """(body, head): the parameters every token's forward multiplies by (all but the input embedding and the
    output head; an embedding lookup costs no FLOPs) and those of the output head, which the fused policy
    runs only at positions that predict a response token (a tied head counts here, once)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(m.weight) for m in (embed, head) if m is not None}
    body = sum(p.numel() for p in model.parameters() if id(p) not in excluded)
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    return body, head_params


GEMM_TIMINGS = 10
"""Timed square GEMMs at start-up (after one untimed warm-up); the rate is the fastest of them."""


def _gemm_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` products ``a @ b`` (synchronised on a GPU), the first one included."""
    cuda = a.device.type != "cpu"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


@cache
def gemm_flops_per_s(dtype: torch.dtype, device: str = "cpu", size: int | None = None) -> float:
    """The GEMM rate of this machine: the fastest of ``GEMM_TIMINGS`` square matmuls of ``dtype`` on
    ``device`` (1024 on CPU, 8192 on a GPU), measured once per process and dtype. The fastest, not the
    median: another job on the machine during start-up slows some of the products, and a rate measured
    under load would put MFU above 1 once the load is gone."""
    n = size or (1024 if device == "cpu" else 8192)
    local = torch.Generator().manual_seed(0)  # never the global RNG: a seeded run must not depend on this
    a = torch.randn(n, n, generator=local).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=local).to(device=device, dtype=dtype)
    times = _gemm_seconds(a, b, GEMM_TIMINGS + 1)[1:]  # the first one warms the library up
    return 2.0 * n**3 / max(min(times), 1e-9)


@dataclass
class TokenMeter:
    """Counts the tokens of every pass the trainer runs in a step, ``forward`` (no gradient) or ``train``:
    real (attention 1), ran (the real tokens the body ran: fewer when shared prefixes run once), processed
    (rows x padded width; the tokens ran when packed) and predicted (response positions, through the head)."""

    real: dict[str, int] = field(default_factory=lambda: {"forward": 0, "train": 0})
    ran: dict[str, int] = field(default_factory=lambda: {"forward": 0, "train": 0})
    processed: dict[str, int] = field(default_factory=lambda: {"forward": 0, "train": 0})
    predicted: dict[str, int] = field(default_factory=lambda: {"forward": 0, "train": 0})

    def add(
        self, attention_mask: torch.Tensor, predicted: int, kind: str, packed: bool = False, ran: int | None = None
    ) -> None:
        """One forward over these rows; ``packed``: the model ran on the real tokens only, ``ran`` of them
        (None: all; fewer with shared prefixes)."""
        real = int(attention_mask.sum())
        ran = real if ran is None or not packed else int(ran)
        self.real[kind] += real
        self.ran[kind] += ran
        self.processed[kind] += ran if packed else int(attention_mask.numel())
        self.predicted[kind] += int(predicted)

    def reset(self) -> None:
        for counts in (self.real, self.ran, self.processed, self.predicted):
            for kind in counts:
                counts[kind] = 0

    def flops(self, params: tuple[int, int], kind: str) -> float:
        """Forward FLOPs of ``kind``'s passes: 2 x (body params x tokens ran + head params x predicted)."""
        body, head = params
        return 2.0 * (body * self.ran[kind] + head * self.predicted[kind])

    def metrics(self, params: tuple[int, int], gemm_rate: float, step_s: float, update_s: float,
                generated_tokens: float = 0.0) -> dict[str, float]:  # fmt: skip
        real = sum(self.real.values())
        ran = sum(self.ran.values())
        processed = sum(self.processed.values())
        train_flops = 3.0 * self.flops(params, "train")  # forward + backward (2x the forward)
        flops = train_flops + self.flops(params, "forward") + 2.0 * sum(params) * generated_tokens
        return {
            "perf/real_tokens": float(real),
            "perf/processed_tokens": float(processed),
            "perf/padding_efficiency": ran / processed if processed else 1.0,
            "perf/prefix_sharing": real / ran if ran else 1.0,
            "perf/model_flops": flops,
            "perf/gemm_tflops": gemm_rate / 1e12,
            "perf/mfu": flops / max(step_s * gemm_rate, 1e-9),
            "perf/update_mfu": train_flops / max(update_s * gemm_rate, 1e-9),
        }
