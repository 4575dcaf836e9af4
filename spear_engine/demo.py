"""``spear demo``: the whole algorithm core on a recorded batch, with a toy policy instead of an LLM.

Each simulated training step takes the next recorded rollout batch (ALFWorld-style episodes,
byte tokens) and runs the trainer's own step on it (:func:`spear_engine.step.train_on_batch`: rewards
with the scheduled tool-call bonus, Dr.BoT filters, group-std filter, behaviour log-probs, advantages,
the self-imitation draw, the actor update (on-policy + c(t)-scaled replay) and the buffer update). The
policy is a bigram table over bytes, so log-probs, entropies, ratios and clip fractions are real and
change with updates.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spear_engine.algorithms.self_imitation import ReplayBatch, SelfImitation, SILBatch
from spear_engine.algorithms.token_ops import entropy_from_logits, logprobs_from_logits
from spear_engine.config import SpearConfig
from spear_engine.data import RolloutBatch, load_episodes
from spear_engine.metrics import episode_metrics
from spear_engine.step import train_on_batch
from spear_engine.train.backends import TorchBackend
from spear_engine.train.update import LossRows

DEFAULT_RECORDING = Path(__file__).parent / "data" / "demo_rollouts.json.gz"
COLUMNS = [
    ("step", "step", "{:.0f}"),
    ("episode/success_rate", "success", "{:.2f}"),
    ("rollout/entropy", "entropy", "{:.3f}"),
    ("actor/pg_loss", "pg_loss", "{:+.4f}"),
    ("actor/pg_clipfrac", "clipfrac", "{:.4f}"),
    ("actor/pg_loss_replay", "pg_replay", "{:+.4f}"),
    ("replay/drawn_rows", "replayed", "{:.0f}"),
    ("trajectory_sft_buffersize", "buffer", "{:.0f}"),
    ("schedule/replay_coef", "c(t)", "{:.3f}"),
    ("schedule/toolcall_bonus_factor", "bonus", "{:.3f}"),
    ("filtered_rows", "filtered", "{:.0f}"),
]


class BigramPolicy(torch.nn.Module):
    """A stand-in for the LLM: next-token logits from the previous token (vocabulary = bytes)."""

    def __init__(self, vocab_size: int, temperature: float) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab_size, vocab_size) * 0.5)
        self.temperature = temperature

    def token_stats(self, previous: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.table[previous] / self.temperature
        return logprobs_from_logits(logits, targets), entropy_from_logits(logits)


class BigramLearner:
    """:class:`spear_engine.step.Learner` for the bigram table: a row's inputs are (previous tokens, targets)."""

    rank, world_size, fused_loss = 0, 1, False

    def __init__(self, policy: BigramPolicy, backend: TorchBackend) -> None:
        self.policy = policy
        self.backend = backend

    def inputs(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        previous = torch.cat([batch.prompts[:, -1:], batch.responses[:, :-1]], dim=1)  # the prompt's last token first
        return previous, batch.responses

    def loss_rows(self, inputs: Any, **tensors: torch.Tensor | None) -> LossRows:
        return LossRows(inputs, **tensors)  # type: ignore[arg-type]

    @torch.no_grad()
    def token_stats(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.token_stats(*inputs)

    def ref_log_prob(self, inputs: Any) -> None:
        return None

    def forward(self, idx: np.ndarray, rows: LossRows, loss: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        previous, targets = rows.inputs
        return self.policy.token_stats(previous[idx], targets[idx])

    def replay_rows(self, replay: ReplayBatch) -> LossRows:
        tokens = torch.as_tensor(replay.tokens, dtype=torch.long)
        previous = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
        return LossRows((previous, tokens), torch.as_tensor(replay.logp), torch.as_tensor(replay.token_advantages()),
                        torch.as_tensor(replay.loss_mask()))  # fmt: skip

    def old_log_probs_from_update(self, rows: int) -> bool:
        return False

    def updating(self) -> nullcontext[None]:
        return nullcontext()

    def gathered_baseline(self, rows: SILBatch) -> None:
        return None


def _print_row(metrics: dict[str, float], header: bool) -> None:
    if header:
        print("  ".join(f"{title:>9s}" for _, title, _ in COLUMNS))
    cells = []
    for key, _, fmt in COLUMNS:
        value = metrics.get(key)
        cells.append(f"{fmt.format(value):>9s}" if value is not None else f"{'-':>9s}")
    print("  ".join(cells))


def run(config: SpearConfig, steps: int, seed: int = 0, recording: str | Path | None = None) -> list[dict[str, float]]:
    """Simulate ``steps`` training steps; prints one line per step and returns every step's metrics."""
    rollouts, meta = load_episodes(recording or DEFAULT_RECORDING)
    config = config.model_copy(update={"trainer": config.trainer.model_copy(update={"seed": seed})})
    torch.manual_seed(seed)
    policy = BigramPolicy(int(meta.get("vocab_size", 256)), config.rollout.temperature)
    learner = BigramLearner(policy, TorchBackend(policy, config.actor.lr, config.actor.weight_decay,
                                                 config.actor.grad_clip))  # fmt: skip
    sil = SelfImitation(config.replay, config.algorithm, seed=seed) if config.replay.enable_trajectory_replay else None
    print(f"spear demo: preset {config.preset}, {steps} steps over {len(rollouts)} recorded batches "
          f"({meta.get('source', 'recording')}); toy bigram policy, lr {config.actor.lr:g}")  # fmt: skip
    history = []
    for step in range(1, steps + 1):
        episodes = rollouts[(step - 1) % len(rollouts)]
        outcome = train_on_batch(config, step, RolloutBatch.from_episodes(episodes), learner, sil)
        metrics = {"step": float(step), **episode_metrics(episodes), **outcome.metrics}
        metrics["filtered_rows"] = float((outcome.scored.response_mask.sum(-1) == 0).sum())
        _print_row(metrics, header=step == 1)
        history.append(metrics)
    return history
