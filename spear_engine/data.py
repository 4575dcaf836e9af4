"""The data model between stages: episodes as the agent loop records them, and the token-level batch.

``Episode`` / ``Turn`` are what a rollout produces (plain Python, JSON-serialisable). ``RolloutBatch``
is the training batch in the official verl-agent *step* layout: one row per env step, prompt left-padded,
response right-padded, with the per-row fields every later stage reads (group / trajectory ids, anchor
observation for GiGPO, validity, rewards, tool-call counts).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Turn:
    """One env step: the prompt the policy saw, what it sampled, and what the environment said."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_logp: list[float]
    """Behaviour log-probs of ``response_ids`` from the rollout engine."""
    response_text: str
    observation: str
    """The raw observation the step was taken from (GiGPO's anchor state)."""
    action_valid: bool
    tool_calls: int
    """Valid tool calls / actions parsed from this response (0 or 1 for ALFWorld-style actions)."""
    reward: float
    """Env reward paid at this step (ALFWorld: 10 at the winning step)."""


@dataclass
class Episode:
    group_id: int
    traj_id: int
    turns: list[Turn]
    success: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def reward(self) -> float:
        return float(sum(t.reward for t in self.turns))

    @property
    def length(self) -> int:
        return len(self.turns)

    @property
    def tool_calls(self) -> int:
        return int(sum(t.tool_calls for t in self.turns))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Episode:
        turns = [Turn(**t) for t in data["turns"]]
        return cls(
            group_id=int(data["group_id"]),
            traj_id=int(data["traj_id"]),
            turns=turns,
            success=bool(data["success"]),
            meta=dict(data.get("meta", {})),
        )


def save_episodes(path: str | Path, rollouts: list[list[Episode]], meta: dict[str, Any] | None = None) -> None:
    """Write several rollout batches (one list of episodes per training step) as JSON (gzipped if *.gz)."""
    payload = {"meta": meta or {}, "rollouts": [[e.to_dict() for e in batch] for batch in rollouts]}
    data = json.dumps(payload, separators=(",", ":")).encode()
    path = Path(path)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def load_episodes(path: str | Path) -> tuple[list[list[Episode]], dict[str, Any]]:
    """Read what :func:`save_episodes` wrote."""
    path = Path(path)
    raw = path.read_bytes()
    payload = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    rollouts = [[Episode.from_dict(e) for e in batch] for batch in payload["rollouts"]]
    return rollouts, payload.get("meta", {})


@dataclass
class RolloutBatch:
    """Step-layout training batch. Tensors are [B, P] (prompt, left-padded) and [B, L] (response)."""

    prompts: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor
    attention_mask: torch.Tensor
    """[B, L] 1 on sampled response tokens (the official replay loss mask)."""
    rollout_log_probs: torch.Tensor
    group_ids: np.ndarray
    traj_ids: np.ndarray
    step_index: np.ndarray
    anchor_obs: list[str]
    response_texts: list[str]
    action_valid: np.ndarray
    step_rewards: np.ndarray
    episode_rewards: np.ndarray
    episode_lengths: np.ndarray
    episode_tool_calls: np.ndarray
    success: np.ndarray

    def __len__(self) -> int:
        return int(self.responses.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1)

    def select(self, index: np.ndarray | list[int]) -> RolloutBatch:
        """The rows at ``index`` (in that order)."""
        idx = np.asarray(index, dtype=np.int64)
        tidx = torch.as_tensor(idx)
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                values[f.name] = v[tidx]
            elif isinstance(v, np.ndarray):
                values[f.name] = v[idx]
            else:
                values[f.name] = [v[i] for i in idx]
        return RolloutBatch(**values)

    @classmethod
    def from_episodes(cls, episodes: list[Episode], pad_token_id: int = 0) -> RolloutBatch:
        """One row per turn of every episode, episodes in order, turns in order."""
        rows = [(e, k, t) for e in episodes for k, t in enumerate(e.turns)]
        if not rows:
            raise ValueError("RolloutBatch.from_episodes: no turns in the given episodes")
        p_len = max(1, max(len(t.prompt_ids) for _, _, t in rows))
        r_len = max(1, max(len(t.response_ids) for _, _, t in rows))
        n = len(rows)
        prompts = torch.full((n, p_len), pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((n, p_len), dtype=torch.long)
        responses = torch.full((n, r_len), pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, r_len), dtype=torch.long)
        logp = torch.zeros((n, r_len), dtype=torch.float32)
        for i, (_, _, t) in enumerate(rows):
            if t.prompt_ids:
                prompts[i, p_len - len(t.prompt_ids) :] = torch.tensor(t.prompt_ids)
                prompt_mask[i, p_len - len(t.prompt_ids) :] = 1
            if t.response_ids:
                responses[i, : len(t.response_ids)] = torch.tensor(t.response_ids)
                attention[i, : len(t.response_ids)] = 1
                logp[i, : len(t.response_logp)] = torch.tensor(t.response_logp)
        return cls(
            prompts=prompts,
            prompt_mask=prompt_mask,
            responses=responses,
            attention_mask=attention,
            rollout_log_probs=logp,
            group_ids=np.array([e.group_id for e, _, _ in rows], dtype=np.int64),
            traj_ids=np.array([e.traj_id for e, _, _ in rows], dtype=np.int64),
            step_index=np.array([k for _, k, _ in rows], dtype=np.int64),
            anchor_obs=[t.observation for _, _, t in rows],
            response_texts=[t.response_text for _, _, t in rows],
            action_valid=np.array([t.action_valid for _, _, t in rows], dtype=bool),
            step_rewards=np.array([t.reward for _, _, t in rows], dtype=np.float64),
            episode_rewards=np.array([e.reward for e, _, _ in rows], dtype=np.float64),
            episode_lengths=np.array([e.length for e, _, _ in rows], dtype=np.int64),
            episode_tool_calls=np.array([e.tool_calls for e, _, _ in rows], dtype=np.int64),
            success=np.array([e.success for e, _, _ in rows], dtype=bool),
        )
