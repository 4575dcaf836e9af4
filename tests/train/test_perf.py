"""perf/* metrics: real and processed tokens of the trainer's passes, padding efficiency, model FLOPs, MFU."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from prefix_oracle import distinct_prefixes, row_tokens

import spear_engine.step as step_module
from spear_engine.config_loading import load_config
from spear_engine.metrics import PlainProgress
from spear_engine.train.perf import TokenMeter, flop_params, gemm_flops_per_s
from spear_engine.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_token_meter_counts_and_formulas() -> None:
    meter = TokenMeter()
    meter.add(torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]), 3, "forward")  # 6 real of 8, 3 through the head
    meter.add(torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]), 2, "train")  # 6 real of 9, 2 through the head
    params = (1000, 300)  # (body, head)
    m = meter.metrics(params, gemm_rate=1e6, step_s=2.0, update_s=0.5, generated_tokens=4)
    assert m["perf/real_tokens"] == 12 and m["perf/processed_tokens"] == 17
    assert m["perf/padding_efficiency"] == pytest.approx(12 / 17)
    train = 6 * (1000 * 6 + 300 * 2)
    flops = train + 2 * (1000 * 6 + 300 * 3) + 2 * 1300 * 4
    assert m["perf/model_flops"] == flops
    assert m["perf/mfu"] == pytest.approx(flops / (2.0 * 1e6))
    assert m["perf/update_mfu"] == pytest.approx(train / (0.5 * 1e6))
    meter.reset()
    assert meter.metrics(params, 1e6, 1.0, 1.0)["perf/model_flops"] == 0


class _LM(torch.nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def test_flop_params_split_body_and_head() -> None:
    assert flop_params(_LM(tied=False)) == (8 * 8 + 8, 50 * 8)  # the lookup table costs nothing
    assert flop_params(_LM(tied=True)) == (8 * 8 + 8, 50 * 8)  # the shared matrix is the head's GEMM


def test_gemm_rate_is_measured_and_cached_and_leaves_the_global_rng_alone() -> None:
    before = torch.get_rng_state()
    rate = gemm_flops_per_s(torch.float32, "cpu", 96)
    assert torch.equal(torch.get_rng_state(), before)  # a seeded run must not depend on when this is measured
    assert math.isfinite(rate) and rate > 1e6  # any CPU multiplies faster than a megaflop per second
    assert gemm_flops_per_s(torch.float32, "cpu", 96) == rate  # measured once per process


def test_gemm_rate_is_the_fastest_timing_after_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy start-up slows some products: the rate is taken from the fastest, never from the warm-up."""
    from spear_engine.train import perf

    timings = [0.001, 0.5, 0.9, 0.02, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]  # warm-up first, then 10 timed
    monkeypatch.setattr(perf, "_gemm_seconds", lambda a, b, repeats: timings[:repeats])
    rate = perf.gemm_flops_per_s.__wrapped__(torch.float32, "cpu", 64)
    assert rate == pytest.approx(2.0 * 64**3 / 0.02)  # not the warm-up's 0.001, not the median's 0.9


@pytest.mark.parametrize(
    "passes", ["separate_old_log_prob_padded", "old_log_prob_from_update_packed", "packed_shared_prefixes"]
)
def test_trainer_reports_the_tokens_of_its_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passes: str
) -> None:
    seen = []
    real_update = step_module.update_actor

    def spy(forward, backend, config, on_policy, *args, **kwargs):
        seen.append(on_policy.inputs)
        return real_update(forward, backend, config, on_policy, *args, **kwargs)

    monkeypatch.setattr(step_module, "update_actor", spy)
    separate = passes == "separate_old_log_prob_padded"
    config = load_config("grpo", [
        "model.path=tiny", "env.name=webshop", "env.max_steps=2", "data.train_batch_size=2", "env.rollout.n=2",
        "data.max_response_length=8", "actor.ppo_mini_batch_size=8", "actor.ppo_micro_batch_size_per_gpu=4",
        "trainer.logger=[jsonl]", "trainer.test_freq=0", "trainer.total_training_steps=1",
        f"trainer.output_dir={tmp_path}", "trainer.run_name=run",
        f"actor.recompute_old_log_prob={'always' if separate else 'auto'}", f"actor.use_remove_padding={not separate}",
        f"actor.share_prefixes={passes == 'packed_shared_prefixes'}",
    ])  # fmt: skip
    trainer = Trainer(config, console=False)
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    (sequences,) = seen
    n, width = sequences.input_ids.shape
    real = int(sequences.attention_mask.sum())
    predicted = int(sequences.response_attention.sum())
    body, head = trainer.flop_params
    shared = passes == "packed_shared_prefixes"
    ran = distinct_prefixes(row_tokens(sequences.input_ids, sequences.attention_mask)) if shared else real
    forward = 2 * (body * ran + head * predicted)
    if separate:  # one forward-only pass (old log-probs) and one training pass (1 epoch), padded rows
        assert metrics["trainer/old_log_prob_from_update"] == 0.0
        assert metrics["perf/real_tokens"] == 2 * real
        assert metrics["perf/processed_tokens"] == 2 * n * width
        assert metrics["perf/padding_efficiency"] == pytest.approx(real / (n * width))
        train_flops, flops = 3 * forward, 4 * forward
    else:  # exactly on-policy: the training pass alone, on packed rows (all in one forward here)
        assert metrics["trainer/old_log_prob_from_update"] == 1.0
        assert metrics["perf/real_tokens"] == real
        assert metrics["perf/processed_tokens"] == ran
        assert metrics["perf/padding_efficiency"] == 1.0
        assert metrics["perf/prefix_sharing"] == pytest.approx(real / ran)
        if shared:  # the rows of a group share their task prompt
            assert ran < 0.9 * real
        train_flops, flops = 3 * forward, 3 * forward
    flops += 2 * (body + head) * metrics["rollout/generated_tokens"]
    assert metrics["perf/model_flops"] == pytest.approx(flops)
    rate = metrics["perf/gemm_tflops"] * 1e12
    assert metrics["perf/mfu"] == pytest.approx(flops / (metrics["time/step"] * rate))
    assert metrics["perf/update_mfu"] == pytest.approx(train_flops / (metrics["time/update"] * rate))


def test_progress_line_shows_mfu_and_padding_efficiency() -> None:
    out = io.StringIO()
    progress = PlainProgress(2, file=out)
    progress.log(1, {"episode/success_rate": 0.5, "perf/mfu": 0.1234, "perf/padding_efficiency": 0.6789,
                     "time/step": 3.0})  # fmt: skip
    assert "mfu 0.123  pad eff 0.68" in out.getvalue()
    assert "prefix share" not in out.getvalue()  # nothing shared, nothing said
    progress.log(2, {"perf/mfu": 0.2, "perf/padding_efficiency": 1.0, "perf/prefix_sharing": 2.345, "time/step": 3.0})
    assert "pad eff 1.00  prefix share 2.35x" in out.getvalue()
