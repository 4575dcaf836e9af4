"""The data model between stages: episodes as the agent loop records them, and the token-level batch.

``Episode`` / ``Turn`` are what a rollout produces (plain Python, JSON-serialisable). ``RolloutBatch``
is the training batch in the official verl-agent *step* layout: one row per env step, prompt left-padded,
response right-padded, with the per-row fields every later stage reads (group / trajectory ids, anchor
observation for GiGPO, validity, rewards, tool-call counts). After rewards and filters a batch becomes a
``ScoredBatch`` and gets its ``Advantages``; the rows it offers the replay buffer are a ``SILBatch`` (flat
tokens with flag bytes), and the rows drawn back are a ``ReplayBatch``. The model-side containers (packed
sequences, loss rows) live with the model code in :mod:`spear_engine.train`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

LEGACY_TURN_KEYS = {"response_logp": "rollout_log_probs"}
"""Turn fields renamed since episodes were first recorded: old recordings still load."""


@dataclass
class Turn:
    """One env step: the prompt the policy saw, what it sampled, and what the environment said."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_log_probs: list[float]
    """Behaviour log-probs of ``response_ids`` from the rollout engine (verl's ``rollout_log_probs``)."""
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
        turns = [Turn(**{LEGACY_TURN_KEYS.get(k, k): v for k, v in t.items()}) for t in data["turns"]]
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
    response_attention_mask: torch.Tensor
    """[B, L] 1 on every real token of the response region (in the trajectory layout that includes the
    observation tokens between turns)."""
    policy_mask: torch.Tensor
    """[B, L] 1 on the tokens the policy sampled: the unfiltered loss mask (step layout: = response_attention_mask)."""
    rollout_log_probs: torch.Tensor
    group_ids: np.ndarray
    traj_ids: np.ndarray
    step_index: np.ndarray
    anchor_obs: list[str]
    response_texts: list[str]
    action_valid: np.ndarray
    invalid_actions: np.ndarray
    """Invalid actions in the row (step layout: 0 or 1; trajectory layout: over all its turns)."""
    step_rewards: np.ndarray
    episode_rewards: np.ndarray
    episode_lengths: np.ndarray
    episode_tool_calls: np.ndarray
    success: np.ndarray
    turn_spans: list[list[tuple[int, int]]]
    """Per row, the [start, end) of each sampled turn in the response region (step layout: one span,
    the whole response; trajectory layout: one per turn, observation tokens between them)."""
    turn_texts: list[list[str]]
    """Per row, the decoded text of each sampled turn (aligned with ``turn_spans``)."""

    def __len__(self) -> int:
        return int(self.responses.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_attention_mask.sum(-1)

    def policy_token_ids(self) -> list[list[int]]:
        """Per row, the sampled token ids."""
        return [row[m.bool()].tolist() for row, m in zip(self.responses, self.policy_mask)]

    def turn_samples(self) -> tuple[list[tuple[int, int, int]], list[list[int]], list[str]]:
        """Every sampled turn as (row, start, end) with its token ids and text: the unit the Dr.BoT
        response filters judge. In the step layout a turn is a row; in the trajectory layout a row holds
        an episode's turns, and each is judged alone against the per-turn budget
        ``data.max_response_length``, as the same turn would be in the step layout."""
        spans, ids, texts = [], [], []
        for i, (row_spans, row_texts) in enumerate(zip(self.turn_spans, self.turn_texts)):
            tokens = self.responses[i]
            for (start, end), text in zip(row_spans, row_texts):
                spans.append((i, start, end))
                ids.append(tokens[start:end].tolist())
                texts.append(text)
        return spans, ids, texts

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
    def from_episodes(cls, episodes: list[Episode], pad_token_id: int = 0, layout: str = "step") -> RolloutBatch:
        """Step layout: one row per turn of every episode (episodes and turns in order). Trajectory
        layout: one row per episode; the prompt is its first turn's prompt and the response region is
        every later token (responses and the observation turns between them)."""
        if layout == "step":
            rows = [_Row.of_turn(e, k, t) for e in episodes for k, t in enumerate(e.turns)]
        elif layout == "trajectory":
            rows = [_Row.of_episode(e) for e in episodes if e.turns]
        else:
            raise ValueError(f"unknown layout '{layout}'; expected 'step' or 'trajectory'")
        if not rows:
            raise ValueError("RolloutBatch.from_episodes: no turns in the given episodes")
        p_len = max(1, max(len(r.prompt) for r in rows))
        r_len = max(1, max(len(r.response) for r in rows))
        n = len(rows)
        prompts = torch.full((n, p_len), pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((n, p_len), dtype=torch.long)
        responses = torch.full((n, r_len), pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, r_len), dtype=torch.long)
        policy = torch.zeros((n, r_len), dtype=torch.long)
        logp = torch.zeros((n, r_len), dtype=torch.float32)
        for i, r in enumerate(rows):
            if r.prompt:
                prompts[i, p_len - len(r.prompt) :] = torch.tensor(r.prompt)
                prompt_mask[i, p_len - len(r.prompt) :] = 1
            if r.response:
                width = len(r.response)
                responses[i, :width] = torch.tensor(r.response)
                attention[i, :width] = 1
                policy[i, :width] = torch.tensor(r.policy, dtype=torch.long)
                logp[i, :width] = torch.tensor(r.logp)
        first = [r.episode for r in rows]
        return cls(
            prompts=prompts,
            prompt_mask=prompt_mask,
            responses=responses,
            response_attention_mask=attention,
            policy_mask=policy,
            rollout_log_probs=logp,
            group_ids=np.array([e.group_id for e in first], dtype=np.int64),
            traj_ids=np.array([e.traj_id for e in first], dtype=np.int64),
            step_index=np.array([r.step for r in rows], dtype=np.int64),
            anchor_obs=[r.observation for r in rows],
            response_texts=[r.text for r in rows],
            action_valid=np.array([r.invalid == 0 for r in rows], dtype=bool),
            invalid_actions=np.array([r.invalid for r in rows], dtype=np.int64),
            step_rewards=np.array([r.reward for r in rows], dtype=np.float64),
            episode_rewards=np.array([e.reward for e in first], dtype=np.float64),
            episode_lengths=np.array([e.length for e in first], dtype=np.int64),
            episode_tool_calls=np.array([e.tool_calls for e in first], dtype=np.int64),
            success=np.array([e.success for e in first], dtype=bool),
            turn_spans=[r.spans for r in rows],
            turn_texts=[r.texts for r in rows],
        )


@dataclass
class _Row:
    """One training row before padding."""

    episode: Episode
    step: int
    prompt: list[int]
    response: list[int]
    policy: list[int]
    logp: list[float]
    text: str
    observation: str
    invalid: int
    reward: float
    spans: list[tuple[int, int]]
    texts: list[str]

    @classmethod
    def of_turn(cls, episode: Episode, k: int, turn: Turn) -> _Row:
        n = len(turn.response_ids)
        return cls(episode, k, list(turn.prompt_ids), list(turn.response_ids), [1] * n,
                   list(turn.rollout_log_probs), turn.response_text, turn.observation, int(not turn.action_valid),
                   turn.reward, [(0, n)], [turn.response_text])  # fmt: skip

    @classmethod
    def of_episode(cls, episode: Episode) -> _Row:
        response: list[int] = []
        policy: list[int] = []
        logp: list[float] = []
        spans: list[tuple[int, int]] = []
        for k, turn in enumerate(episode.turns):
            if k > 0:
                response += turn.prompt_ids
                policy += [0] * len(turn.prompt_ids)
                logp += [0.0] * len(turn.prompt_ids)
            spans.append((len(response), len(response) + len(turn.response_ids)))
            response += turn.response_ids
            policy += [1] * len(turn.response_ids)
            logp += list(turn.rollout_log_probs)
        first = episode.turns[0]
        texts = [t.response_text for t in episode.turns]
        return cls(episode, 0, list(first.prompt_ids), response, policy, logp, "\n".join(texts),
                   first.observation, sum(not t.action_valid for t in episode.turns), episode.reward, spans,
                   texts)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# after rewards and filters, and the replay buffer's rows
# ---------------------------------------------------------------------------------------------
MASK_ATTENTION = 1
"""Flag bit: a response token (the official agent actor's replay loss mask is this attention mask)."""
MASK_RESPONSE = 2
"""Flag bit: a response token that survived the Dr.BoT filters (the filtered ``response_mask``)."""


@dataclass
class ScoredBatch:
    """A rollout batch after rewards and filters: what the advantage and update stages need."""

    batch: RolloutBatch
    token_level_scores: torch.Tensor
    """[B, L] episode reward + tool bonus at the last response token (before the invalid penalty)."""
    response_mask: torch.Tensor
    """[B, L] the policy-token mask with Dr.BoT-flagged rows zeroed (when the filters apply)."""


@dataclass
class Advantages:
    token_level_rewards: torch.Tensor
    advantages: torch.Tensor
    """[B, L] on-policy advantages (already multiplied by the response mask)."""
    row_advantages: np.ndarray
    """[B] the scalar advantage of each row (0 for a row whose mask is empty)."""
    episode_advantages: np.ndarray
    """[B] the episode-level part (GiGPO without its step term; GRPO: the same as row_advantages)."""
    token_level_scores: torch.Tensor | None = None
    """[B, L] the scores after the invalid-action penalty and before KL-in-reward (the official
    ``reward_tensor`` the replay buffer stores); None = the same as ``token_level_rewards``."""


@dataclass
class SILBatch:
    """The rows of one training step offered to the buffer (the post-rollout-filter batch).

    ``tokens``/``logp``/``mask`` are the concatenation of the rows (``lengths`` gives each row's length):
    int32 token ids, float32 behaviour log-probs, uint8 flag bytes. ``scores`` is each row's summed
    reward tensor (episode reward + tool bonus - invalid penalty). ``advantages`` is the row's on-policy
    scalar advantage; ``episode_advantages`` its episode-level part (GiGPO: without the step term;
    defaults to ``advantages``), used by trajectory-level admission.
    """

    tokens: np.ndarray
    logp: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    group_ids: np.ndarray
    traj_ids: np.ndarray
    scores: np.ndarray
    advantages: np.ndarray
    episode_advantages: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.tokens = np.ascontiguousarray(self.tokens, dtype=np.int32)
        self.logp = np.ascontiguousarray(self.logp, dtype=np.float32)
        self.mask = np.ascontiguousarray(self.mask, dtype=np.uint8)
        self.lengths = np.ascontiguousarray(self.lengths, dtype=np.int32)
        for name in ("group_ids", "traj_ids"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.int64))
        for name in ("scores", "advantages"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float64))
        if self.episode_advantages is None:
            self.episode_advantages = self.advantages
        self.episode_advantages = np.ascontiguousarray(self.episode_advantages, dtype=np.float64)
        n = len(self.lengths)
        for name in ("group_ids", "traj_ids", "scores", "advantages", "episode_advantages"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SILBatch.{name} has {len(getattr(self, name))} rows, lengths has {n}")
        total = int(self.lengths.sum())
        for name in ("tokens", "logp", "mask"):
            if len(getattr(self, name)) != total:
                raise ValueError(
                    f"SILBatch.{name} has {len(getattr(self, name))} tokens, lengths sum to {total}"
                )

    def __len__(self) -> int:
        return len(self.lengths)

    def row_has_flag(self, flag: int) -> np.ndarray:
        """Per row: does any of its tokens carry ``flag``?"""
        ends = np.cumsum(self.lengths, dtype=np.int64)
        hits = np.concatenate([[0], np.cumsum((self.mask & flag) > 0, dtype=np.int64)])
        return (hits[ends] - hits[ends - self.lengths]) > 0


@dataclass
class ReplayBatch:
    """Rows drawn for a self-imitation update, right-padded, with their recalibrated advantages."""

    row_ids: np.ndarray
    tokens: np.ndarray
    logp: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    advantages: np.ndarray
    scores: np.ndarray
    steps: np.ndarray
    loss_mask_flag: int

    def __len__(self) -> int:
        return len(self.row_ids)

    def loss_mask(self) -> np.ndarray:
        """[k, Lmax] float32 loss mask: the tokens whose flag byte carries the configured bit."""
        return ((self.mask & self.loss_mask_flag) > 0).astype(np.float32)

    def token_advantages(self) -> np.ndarray:
        """[k, Lmax] advantages: the row's recalibrated scalar on its loss-mask tokens, 0 elsewhere."""
        return self.advantages[:, None].astype(np.float32) * self.loss_mask()
