"""``spear demo``: the whole algorithm core on a recorded batch, with a toy policy instead of an LLM.

Each simulated training step takes the next recorded rollout batch (ALFWorld-style episodes,
byte tokens) and runs the SPEAR step of DESIGN.md: rewards with the scheduled tool-call bonus,
Dr.BoT filters, group-std filter, behaviour log-probs, advantages, the self-imitation draw, the
actor update (on-policy + c(t)-scaled replay) and the buffer update. The policy is a bigram table
over bytes, so log-probs, entropies, ratios and clip fractions are real and change with updates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spear_engine.algorithms.losses import agg_loss
from spear_engine.algorithms.self_imitation import ReplayBatch, SelfImitation
from spear_engine.algorithms.token_ops import entropy_from_logits, logprobs_from_logits
from spear_engine.config import SpearConfig
from spear_engine.data import Episode, RolloutBatch, load_episodes
from spear_engine.metrics import episode_metrics
from spear_engine.pipeline import (
    compute_advantages,
    filter_groups,
    pad_batch,
    schedule_metrics,
    score_and_filter,
    sil_batch,
)
from spear_engine.train.backends import TorchBackend
from spear_engine.train.update import LossRows, update_actor

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


def _previous_tokens_of_responses(batch: RolloutBatch) -> torch.Tensor:
    """For response position k: the token before it (the prompt's last token for k = 0)."""
    return torch.cat([batch.prompts[:, -1:], batch.responses[:, :-1]], dim=1)


def _previous_tokens_of_sequences(tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)


def valid_action_ratio(episodes: list[Episode]) -> float:
    return float(np.mean([t.action_valid for e in episodes for t in e.turns]))


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
    torch.manual_seed(seed)
    policy = BigramPolicy(int(meta.get("vocab_size", 256)), config.rollout.temperature)
    backend = TorchBackend(policy, config.actor.lr, config.actor.weight_decay, config.actor.grad_clip)
    sil = SelfImitation(config.replay, config.algorithm, seed=seed) if config.replay.enable_trajectory_replay else None
    print(f"spear demo: preset {config.preset}, {steps} steps over {len(rollouts)} recorded batches "
          f"({meta.get('source', 'recording')}); toy bigram policy, lr {config.actor.lr:g}")  # fmt: skip

    def forward(idx: np.ndarray, rows: LossRows) -> tuple[torch.Tensor, torch.Tensor]:
        previous, targets = rows.inputs
        return policy.token_stats(previous[idx], targets[idx])

    history = []
    for step in range(1, steps + 1):
        episodes = rollouts[(step - 1) % len(rollouts)]
        metrics: dict[str, float] = {"step": float(step), **schedule_metrics(config, step), **episode_metrics(episodes),
                                      "valid_action_ratio": valid_action_ratio(episodes)}  # fmt: skip
        rng = np.random.default_rng((seed % 2**32, step))
        batch, m = pad_batch(config, RolloutBatch.from_episodes(episodes), rng)
        metrics.update(m)
        scored, m = score_and_filter(config, batch, step)
        metrics.update(m)
        metrics["filtered_rows"] = float((scored.response_mask.sum(-1) == 0).sum())
        scored, m = filter_groups(config, scored, seed + step)
        metrics.update(m)
        batch = scored.batch
        previous, targets = _previous_tokens_of_responses(batch), batch.responses
        with torch.no_grad():
            old_log_probs, entropy = policy.token_stats(previous, targets)
        metrics["actor/entropy_loss"] = float(agg_loss(entropy, scored.response_mask, config.actor.loss_agg_mode))
        metrics["rollout/entropy"] = float(agg_loss(entropy, batch.policy_mask.float(), "token-mean"))
        advantages, m = compute_advantages(config, scored)
        metrics.update(m)
        replay_rows = None
        if sil is not None:
            replay, m = sil.draw(step, on_policy_rows=len(batch))
            metrics.update(m)
            replay_rows = _replay_loss_rows(replay) if replay is not None else None
        mask = scored.response_mask if config.actor.use_filtered_response_mask else batch.policy_mask.float()
        on_policy = LossRows((previous, targets), old_log_probs, advantages.advantages, mask)
        metrics.update(
            update_actor(
                forward, backend, config.actor, on_policy, replay_rows,
                replay_coef=metrics["schedule/replay_coef"], replay_update=config.replay.replay_update,
            )
        )  # fmt: skip
        if sil is not None:
            metrics.update(sil.update(step, sil_batch(scored, advantages, old_log_probs)))
        _print_row(metrics, header=step == 1)
        history.append(metrics)
    return history


def _replay_loss_rows(replay: ReplayBatch) -> LossRows:
    tokens = torch.as_tensor(replay.tokens, dtype=torch.long)
    return LossRows(
        (_previous_tokens_of_sequences(tokens), tokens),
        torch.as_tensor(replay.logp),
        torch.as_tensor(replay.token_advantages()),
        torch.as_tensor(replay.loss_mask()),
    )
