"""Packed (padding-free) forwards against the padded oracle: same log-probs, entropies and gradients.

Rows come from episodes through ``RolloutBatch`` in both layouts (step: one row per turn, prompts of
different lengths left-padded; trajectory: one row per episode, observations inside the response),
and from stored replay rows (``SequenceBatch.from_flagged_rows``). Token ids, lengths and loss weights
are drawn fresh from a seeded generator per test. The update-level tests check that token-budget
micro-batches (``actor.use_dynamic_bsz``) leave the loss normalisation, hence the step, unchanged.
The 2-rank ZeRO-3 backend is covered by ``test_zero3_parity.py`` (packed ranks vs one padded process).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from prefix_oracle import distinct_prefixes, row_tokens

from spear_engine.config import ActorConfig, PolicyLossConfig
from spear_engine.data import Episode, RolloutBatch, Turn
from spear_engine.models import load_model
from spear_engine.train.backends import TorchBackend
from spear_engine.train.policy import FusedHeadPolicy, SequenceBatch
from spear_engine.train.prefix_tree import distinct_tokens, pack_prefix_tree, shared_prefix_chunks
from spear_engine.train.update import LossRows, micro_batches, token_budget_chunks, update_actor

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=0.05, atol=0.08)}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    model, _ = load_model("tiny")
    return model


def _episode(g: torch.Generator, traj: int, vocab: int) -> Episode:
    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    turns = []
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        response = ids(1, 9)
        turns.append(Turn(prompt_ids=ids(2, 15), response_ids=response, rollout_log_probs=[-1.0] * len(response),
                          response_text="<action>go</action>", observation="obs", action_valid=True, tool_calls=0,
                          reward=0.0))  # fmt: skip
    return Episode(group_id=0, traj_id=traj, turns=turns, success=False)


def episode_rows(layout: str, seed: int, vocab: int) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    batch = RolloutBatch.from_episodes([_episode(g, i, vocab) for i in range(5)], 0, layout=layout)
    return SequenceBatch.from_prompt_response(
        batch.prompts, batch.prompt_mask, batch.responses, batch.response_attention_mask
    )


def replay_rows(seed: int, vocab: int) -> SequenceBatch:
    """Stored rows (right-padded, each its own first sampled position), as the replay buffer returns them."""
    g = torch.Generator().manual_seed(seed)
    n, width = 5, 30
    lengths = torch.randint(6, width + 1, (n,), generator=g)
    tokens = torch.randint(3, vocab, (n, width), generator=g)
    flags = torch.zeros(n, width, dtype=torch.bool)
    for i, length in enumerate(lengths.tolist()):
        first = int(torch.randint(2, length - 2, (1,), generator=g))
        flags[i, first:length] = True
    return SequenceBatch.from_flagged_rows(tokens, flags, lengths, pad_id=0)[0]


def _group_episodes(g: torch.Generator, vocab: int) -> list[Episode]:
    """Two groups of three episodes that start alike, as a group's episodes do (same task prompt, some the same
    first action): turn prompts share prefixes, a few whole rows repeat and one row is a prefix of another."""

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    def turn(prompt: list[int], response: list[int]) -> Turn:
        return Turn(prompt_ids=prompt, response_ids=response, rollout_log_probs=[-1.0] * len(response),
                    response_text="<action>go</action>", observation="obs", action_valid=True, tool_calls=0,
                    reward=0.0)  # fmt: skip

    episodes = []
    for group in range(2):
        task, first = ids(6, 12), ids(2, 5)
        for k in range(3):
            turns, history = [], task + first
            for step in range(int(torch.randint(1, 4, (1,), generator=g))):
                same = step == 0 and k < 2  # the first two episodes open with the same action
                response = first if same else ids(1, 7)
                turns.append(turn(list(history), response))
                history = history + response + ids(1, 4)  # the next prompt extends this one
            episodes.append(Episode(group_id=group, traj_id=3 * group + k, turns=turns, success=False))
    return episodes


def shared_rows(source: str, seed: int, vocab: int) -> SequenceBatch:
    """Rows with shared prefixes from episodes (step / trajectory layout) or stored replay rows."""
    g = torch.Generator().manual_seed(seed)
    episodes = _group_episodes(g, vocab)
    batch = RolloutBatch.from_episodes(episodes, 0, layout="step" if source == "replay" else source)
    rows = SequenceBatch.from_prompt_response(batch.prompts, batch.prompt_mask, batch.responses,
                                              batch.response_attention_mask)  # fmt: skip
    if source != "replay":
        return rows
    real = rows.attention_mask.bool()  # the same rows as the replay buffer stores them: right-padded, flagged
    lengths = real.sum(1)
    tokens = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)
    flags = torch.zeros(tokens.shape, dtype=torch.bool)
    for i in range(len(lengths)):
        n, prompt = int(lengths[i]), int(real[i, : rows.prompt_width].sum())
        tokens[i, :n] = rows.input_ids[i][real[i]]
        flags[i, prompt:n] = True
    return SequenceBatch.from_flagged_rows(tokens, flags, lengths, pad_id=0)[0]


def forward_and_grads(
    model: torch.nn.Module, rows: SequenceBatch, packed: bool, seed: int, share_prefixes: bool = False
):
    policy = FusedHeadPolicy(copy.deepcopy(model), packed=packed, share_prefixes=share_prefixes)
    device = next(model.parameters()).device
    logp, entropy = policy(rows.to(device))
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(logp.shape, generator=g).to(device)
    ((logp * weights).sum() + 0.3 * entropy.sum()).backward()
    grads = {n: p.grad.float().cpu() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logp.detach().cpu(), entropy.detach().cpu(), grads


def assert_same(padded, packed, valid: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(packed[0][valid], padded[0][valid], **tol)
    torch.testing.assert_close(packed[1][valid], padded[1][valid], **tol)
    assert (packed[0][~valid] == 0).all() and (packed[1][~valid] == 0).all()
    assert padded[2].keys() == packed[2].keys() and len(padded[2]) > 0
    for name, grad in padded[2].items():
        scale = float(grad.abs().max()) + 1e-12
        err = float((packed[2][name] - grad).abs().max()) / scale
        assert err < (1e-4 if dtype == torch.float32 else 0.1), (name, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("source", ["step", "trajectory", "replay"])
def test_packed_forward_matches_padded(tiny: torch.nn.Module, source: str, dtype: torch.dtype) -> None:
    seed = {"step": 11, "trajectory": 12, "replay": 13}[source]
    vocab = tiny.config.vocab_size
    rows = replay_rows(seed, vocab) if source == "replay" else episode_rows(source, seed, vocab)
    assert (rows.attention_mask == 0).any()  # there is padding to remove
    model = copy.deepcopy(tiny).to(dtype)
    padded = forward_and_grads(model, rows, packed=False, seed=seed)
    packed = forward_and_grads(model, rows, packed=True, seed=seed)
    assert_same(padded, packed, rows.response_attention.bool(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("source", ["step", "trajectory", "replay"])
def test_shared_prefix_forward_matches_padded(tiny: torch.nn.Module, source: str, dtype: torch.dtype) -> None:
    """``actor.share_prefixes``: each shared prefix runs once, and every row's log-probs, entropies and the
    gradients are those of the padded forward (where every row runs on its own)."""
    seed = {"step": 61, "trajectory": 62, "replay": 63}[source]
    rows = shared_rows(source, seed, tiny.config.vocab_size)
    tree = pack_prefix_tree(rows.input_ids, rows.attention_mask.bool())
    assert tree is not None
    real = int(rows.attention_mask.sum())
    tree_size = distinct_prefixes(row_tokens(rows.input_ids, rows.attention_mask))
    assert tree["input_ids"].shape[1] == tree_size < 0.8 * real  # prefixes really are shared
    ids = tree["input_ids"][0]
    for i in range(len(rows.input_ids)):  # every real token maps to a node holding that token, at its depth
        mask = rows.attention_mask[i].bool()
        nodes = tree["index"][i][mask]
        assert torch.equal(ids[nodes], rows.input_ids[i][mask])
        assert torch.equal(tree["position_ids"][0][nodes], torch.arange(int(mask.sum())))
    model = copy.deepcopy(tiny).to(dtype)
    padded = forward_and_grads(model, rows, packed=False, seed=seed)
    shared = forward_and_grads(model, rows, packed=True, seed=seed, share_prefixes=True)
    assert_same(padded, shared, rows.response_attention.bool(), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it there)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("share_prefixes", [False, True], ids=["packed", "shared"])
def test_packed_forward_matches_padded_on_cuda(tiny: torch.nn.Module, share_prefixes: bool, dtype: torch.dtype) -> None:
    """The GPU attention of packed rows (flash-attn varlen when installed, else SDPA per row) against the
    padded forward on the same GPU, with and without shared prefixes."""
    rows = shared_rows("step", 65, tiny.config.vocab_size)
    model = copy.deepcopy(tiny).to(device="cuda", dtype=dtype)
    padded = forward_and_grads(model, rows, packed=False, seed=65)
    packed = forward_and_grads(model, rows, packed=True, seed=65, share_prefixes=share_prefixes)
    assert_same(padded, packed, rows.response_attention.bool(), dtype)


def test_shared_prefix_rows_never_attend_across_rows(tiny: torch.nn.Module) -> None:
    """A row that shares a prefix with others sees only its own path: changing its last token changes its own
    log-probs and leaves every other row's exactly as they were."""
    rows = shared_rows("step", 71, tiny.config.vocab_size)
    policy = FusedHeadPolicy(copy.deepcopy(tiny), packed=True, share_prefixes=True)
    real = rows.attention_mask.bool()
    lengths = real.sum(1)
    last = int(torch.argmax(lengths))  # the longest row: its last token is in no other row
    with torch.no_grad():
        before, _ = policy(rows)
        changed = SequenceBatch(rows.input_ids.clone(), rows.attention_mask, rows.prompt_width)
        end = int(torch.nonzero(real[last])[-1])
        changed.input_ids[last, end - 1] = (changed.input_ids[last, end - 1] + 1) % tiny.config.vocab_size
        after, _ = policy(changed)
    others = torch.arange(len(lengths)) != last
    assert not torch.equal(before[last], after[last])
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)


def test_packed_rows_never_attend_across_rows(tiny: torch.nn.Module) -> None:
    """Changing one row's tokens leaves every other row's log-probs exactly as they were."""
    rows = episode_rows("step", 21, tiny.config.vocab_size)
    policy = FusedHeadPolicy(copy.deepcopy(tiny), packed=True)
    with torch.no_grad():
        before, _ = policy(rows)
        changed = SequenceBatch(rows.input_ids.clone(), rows.attention_mask, rows.prompt_width)
        real = changed.attention_mask[0].bool()
        changed.input_ids[0, real] = (changed.input_ids[0, real] + 1) % tiny.config.vocab_size
        after, _ = policy(changed)
    assert not torch.equal(before[0], after[0])
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=1e-6)


def test_autocast_bf16_keeps_fp32_weights_and_grads(tiny: torch.nn.Module) -> None:
    """``actor.autocast=bf16``: bf16 products, fp32 master weights and gradients, log-probs near fp32's."""
    rows = episode_rows("step", 31, tiny.config.vocab_size)
    exact = forward_and_grads(tiny, rows, packed=True, seed=31)
    policy = FusedHeadPolicy(copy.deepcopy(tiny), packed=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy = policy(rows)
    assert logp.dtype == torch.float32
    (
        (logp * torch.randn(logp.shape, generator=torch.Generator().manual_seed(31))).sum()
        + 0.3 * entropy.sum()
    ).backward()
    valid = rows.response_attention.bool()
    torch.testing.assert_close(logp.detach()[valid], exact[0][valid], **TOLERANCE[torch.bfloat16])
    for name, p in policy.model.named_parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), name
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
    for name, grad in exact[2].items():  # bf16 products: ~1-10 % of the norm (random model, small grads)
        err = float((grads[name] - grad).norm()) / (float(grad.norm()) + 1e-12)
        assert err < 0.15, (name, err)


# ------------------------------------------------------------------------------------------------ update
class RecordingBackend(TorchBackend):
    """Keeps the gradients each optimizer step sees."""

    def step(self) -> tuple[float, bool]:
        self.grads = {n: p.grad.clone() for n, p in self.hf_model.named_parameters() if p.grad is not None}
        return super().step()


def assert_close_grads(actual: dict, expected: dict, rel: float) -> None:
    assert actual.keys() == expected.keys() and expected
    for name, grad in expected.items():
        err = float((actual[name] - grad).norm()) / (float(grad.norm()) + 1e-20)
        assert err < rel, (name, err)


def test_token_budget_chunks_fill_up_to_the_budget() -> None:
    g = np.random.default_rng(5)
    tokens = g.integers(1, 40, size=50)
    for budget in (1, 17, 40, 100, 10_000):
        chunks = token_budget_chunks(tokens, budget)
        assert np.array_equal(np.concatenate(chunks), np.arange(len(tokens)))  # every row once, in order
        for chunk in chunks:
            assert len(chunk) == 1 or tokens[chunk].sum() <= budget
        for a, b in itertools.pairwise(chunks):  # greedy: the next row did not fit
            assert tokens[a].sum() + tokens[b[0]] > budget
    assert token_budget_chunks(np.array([], dtype=int), 10) == []


def test_shared_prefix_chunks_group_common_prefixes_within_the_budget() -> None:
    g = np.random.default_rng(7)
    stems = [g.integers(0, 5, size=g.integers(1, 12)).tolist() for _ in range(6)]
    rows = [stems[g.integers(0, 6)] + g.integers(0, 5, size=g.integers(0, 8)).tolist() for _ in range(60)]
    rows = [r for r in rows if r]
    for budget in (1, 9, 30, 100, 10_000):
        chunks = shared_prefix_chunks(rows, budget)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(len(rows)))  # every row once
        for chunk in chunks:
            group = [rows[i] for i in chunk]
            cost = distinct_prefixes(group)
            assert distinct_tokens(group) == cost
            assert len(chunk) == 1 or cost <= budget
        for a, b in itertools.pairwise(chunks):  # greedy: the next row did not fit
            assert distinct_prefixes([rows[i] for i in (*a, b[0])]) > budget
        order = np.concatenate(chunks)
        assert [rows[i] for i in order] == sorted(rows)  # rows with a common prefix side by side
    assert shared_prefix_chunks([], 10) == []


def one_update(
    tiny: torch.nn.Module, on_policy: LossRows, config: ActorConfig, packed: bool, share_prefixes: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(gradients of the optimizer step, metrics) of one ``update_actor`` of a fresh copy of ``tiny``."""
    policy = FusedHeadPolicy(copy.deepcopy(tiny), packed=packed, share_prefixes=share_prefixes)
    backend = RecordingBackend(policy, lr=1e-2, weight_decay=0.0, grad_clip=1e9)
    metrics = update_actor(lambda idx, r: backend.forward(r.inputs.select(torch.as_tensor(idx))), backend, config,
                           on_policy)  # fmt: skip
    return backend.grads, metrics


def step_config(mode: str, dynamic: bool, budget: int) -> ActorConfig:
    """One optimizer step (vanilla loss, ``mode`` aggregation), 2 rows or ``budget`` tokens per forward."""
    return ActorConfig(ppo_mini_batch_size=64, ppo_micro_batch_size_per_gpu=2, lr=1e-2, grad_clip=1e9,
                       entropy_coeff=0.01, loss_agg_mode=mode, use_dynamic_bsz=dynamic,
                       ppo_max_token_len_per_gpu=budget, policy_loss=PolicyLossConfig(loss_mode="vanilla"))  # fmt: skip


def _loss_rows(inputs: SequenceBatch, seed: int) -> LossRows:
    g = torch.Generator().manual_seed(seed)
    mask = inputs.response_attention.float()
    mask[:, -1] *= (torch.rand(len(mask), generator=g) > 0.3).float()  # some tokens out of the loss
    old = -torch.rand(mask.shape, generator=g) * 4 - 4
    adv = torch.randn(len(mask), 1, generator=g).expand_as(mask) * mask
    return LossRows(inputs, old * mask, adv.contiguous(), mask, tokens=inputs.row_tokens)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_packed_token_budget_update_matches_padded_row_micro_batches(
    tiny: torch.nn.Module, mode: str
) -> None:
    """One PPO step: packed rows in token-budget micro-batches vs padded rows, 2 per micro-batch."""
    rows = episode_rows("trajectory", 41, tiny.config.vocab_size)
    on_policy = _loss_rows(rows, 41)
    results = []
    for packed, dynamic in ((False, False), (True, True)):
        config = step_config(mode, dynamic, budget=40)
        mini = np.arange(len(on_policy))
        if dynamic:  # the budget really splits the rows differently from 2 per micro-batch
            assert [len(m) for m in micro_batches(on_policy.tokens, mini, config)] != [
                len(m) for m in np.array_split(mini, 3)
            ]
        results.append(one_update(tiny, on_policy, config, packed))
    (padded_grads, padded_metrics), (packed_grads, packed_metrics) = results
    assert padded_metrics["actor/optimizer_steps"] == packed_metrics["actor/optimizer_steps"] == 1
    assert_close_grads(packed_grads, padded_grads, 1e-4)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_shared_prefix_update_matches_padded_row_micro_batches(tiny: torch.nn.Module, mode: str) -> None:
    """One PPO step on rows with shared prefixes: prefix-tree forwards in micro-batches that gather common
    prefixes (a budget that counts a shared token once) vs padded rows, 2 per micro-batch, in batch order."""
    rows = shared_rows("step", 81, tiny.config.vocab_size)
    results = []
    for shared in (False, True):
        on_policy = _loss_rows(rows, 81)
        if shared:
            on_policy.row_ids = row_tokens(rows.input_ids, rows.attention_mask)
        config = step_config(mode, shared, budget=60)
        if shared:  # more than one forward, and not in batch order
            micros = micro_batches(on_policy.tokens, np.arange(len(on_policy)), config, on_policy.row_ids)
            assert len(micros) > 1 and not np.array_equal(np.concatenate(micros), np.arange(len(on_policy)))
        results.append(one_update(tiny, on_policy, config, packed=shared, share_prefixes=shared))
    (padded_grads, padded_metrics), (shared_grads, shared_metrics) = results
    assert padded_metrics["actor/optimizer_steps"] == shared_metrics["actor/optimizer_steps"] == 1
    assert_close_grads(shared_grads, padded_grads, 1e-4)


def test_on_policy_rows_take_old_log_probs_from_their_first_forward(tiny: torch.nn.Module) -> None:
    """``old_log_prob=None`` (one epoch, one mini-batch): the step equals one with the old log-probs of a
    separate no-grad pass, and the rows' forward log-probs are handed back."""
    rows = episode_rows("step", 51, tiny.config.vocab_size)
    config = ActorConfig(ppo_mini_batch_size=64, ppo_micro_batch_size_per_gpu=4, lr=1e-2, grad_clip=1e9,
                         entropy_coeff=0.01, ppo_max_token_len_per_gpu=50)  # fmt: skip
    separate_rows = _loss_rows(rows, 51)
    with torch.no_grad():
        old, _ = FusedHeadPolicy(copy.deepcopy(tiny), packed=True)(rows)
    separate_rows.old_log_prob = old
    reuse_rows = copy.copy(separate_rows)
    reuse_rows.old_log_prob = None
    grads = [one_update(tiny, on_policy, config, packed=True)[0] for on_policy in (separate_rows, reuse_rows)]
    assert_close_grads(grads[1], grads[0], 1e-5)
    assert reuse_rows.forward_log_prob is not None
    torch.testing.assert_close(reuse_rows.forward_log_prob, old, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one epoch and one mini-batch"):
        update_actor(
            lambda idx, r: None, None, config.model_copy(update={"ppo_epochs": 2}), copy.copy(reuse_rows)
        )


def test_learner_no_grad_pass_returns_rows_in_batch_order_with_shared_prefixes(tiny: torch.nn.Module) -> None:
    """The separate log-prob pass (old / reference log-probs) forwards rows grouped by prefix, out of batch
    order, and hands each row's values back in its own place; the token meter counts the tokens ran."""
    from spear_engine.config_loading import load_config
    from spear_engine.train.learner import PolicyLearner
    from spear_engine.train.perf import TokenMeter

    rows = shared_rows("step", 91, tiny.config.vocab_size)
    config = load_config("grpo", ["model.path=tiny", "actor.ppo_max_token_len_per_gpu=60"])
    policy = FusedHeadPolicy(copy.deepcopy(tiny), packed=True, share_prefixes=True)
    meter = TokenMeter()
    learner = PolicyLearner(config, policy, None, TorchBackend(policy, lr=1e-3, weight_decay=0.0, grad_clip=1.0),
                            None, True, torch.device("cpu"), 0, meter)  # fmt: skip
    row_ids = row_tokens(rows.input_ids, rows.attention_mask)
    micros = micro_batches(rows.row_tokens, np.arange(len(row_ids)), config.actor, row_ids)
    assert len(micros) > 1 and not np.array_equal(np.concatenate(micros), np.arange(len(row_ids)))
    log_probs, entropy = learner.token_stats(rows)
    with torch.no_grad():
        expected = FusedHeadPolicy(copy.deepcopy(tiny), packed=False)(rows)
    valid = rows.response_attention.bool()
    torch.testing.assert_close(log_probs[valid], expected[0][valid], **TOLERANCE[torch.float32])
    torch.testing.assert_close(entropy[valid], expected[1][valid], **TOLERANCE[torch.float32])
    assert meter.real["forward"] == int(rows.attention_mask.sum())
    assert meter.ran["forward"] == sum(distinct_tokens([row_ids[i] for i in m]) for m in micros)
    assert meter.ran["forward"] < meter.real["forward"]
