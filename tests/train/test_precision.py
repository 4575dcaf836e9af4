"""``actor.autocast``: ``auto`` runs bf16 products only where the device multiplies bf16 natively (on an
AVX2-only CPU bf16 GEMMs are emulated, 75-145x slower than fp32), ``bf16`` forces them (with a warning there),
``none`` never. The hardware probe is monkeypatched both ways, so every branch runs on any machine."""

from __future__ import annotations

import logging

import pytest
import torch

from spear_engine.config_loading import load_config
from spear_engine.models import load_model
from spear_engine.train import precision
from spear_engine.train.backends import TorchBackend
from spear_engine.train.learner import PolicyLearner
from spear_engine.train.perf import TokenMeter
from spear_engine.train.policy import FusedHeadPolicy, SequenceBatch

CPU = torch.device("cpu")


def _cpu_probes(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True),
                                                            (False, True, True), (True, True, True)])  # fmt: skip
def test_native_bf16_on_cpu_needs_avx512_bf16_or_amx(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool,
                                                     native: bool) -> None:  # fmt: skip
    _cpu_probes(monkeypatch, avx512_bf16, amx)
    assert precision.native_bf16(CPU) is native


def test_native_bf16_on_cpu_without_torchs_probes_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older or non-x86 torch without the probes: fp32, the safe guess."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert precision.native_bf16(CPU) is False


def test_native_bf16_on_cuda_asks_torch_without_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or not including_emulation)  # fmt: skip
    assert precision.native_bf16(torch.device("cuda")) is True
    assert asked == [False]


@pytest.mark.parametrize("native", [False, True])
def test_settings(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native: bool) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert precision.autocast_bf16("none", CPU) is False
        assert precision.autocast_bf16("auto", CPU) is native
        assert not caplog.records
        assert precision.autocast_bf16("bf16", CPU) is True
    warned = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    with pytest.raises(ValueError, match="none, bf16, auto"):
        precision.autocast_bf16("fp16", CPU)  # type: ignore[arg-type]


def test_config_accepts_auto_and_rejects_other_values() -> None:
    assert load_config("grpo", ["actor.autocast=auto"]).actor.autocast == "auto"
    with pytest.raises(Exception, match="autocast"):
        load_config("grpo", ["actor.autocast=fp16"])


def test_quickstart_picks_bf16_only_where_it_is_native() -> None:
    assert load_config("quickstart").actor.autocast == "auto"


@pytest.mark.parametrize(("setting", "native", "expected"), [("auto", False, False), ("auto", True, True),
                                                              ("none", True, False), ("bf16", False, True)])  # fmt: skip
def test_learner_passes_run_under_the_resolved_autocast(monkeypatch: pytest.MonkeyPatch, setting: str,
                                                        native: bool, expected: bool) -> None:  # fmt: skip
    """The learner's no-grad pass (old / reference log-probs) runs the model under bf16 autocast exactly when
    the setting resolves to it on this device; log-probs stay fp32 either way."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    model, _ = load_model("tiny")
    seen: list[bool] = []
    model.get_decoder().register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    policy = FusedHeadPolicy(model, packed=True)
    config = load_config("grpo", ["model.path=tiny", f"actor.autocast={setting}"])
    learner = PolicyLearner(config, policy, None, TorchBackend(policy, lr=1e-3, weight_decay=0.0, grad_clip=1.0),
                            None, True, CPU, 0, TokenMeter())  # fmt: skip
    assert learner.bf16_autocast is expected
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    rows = SequenceBatch.from_prompt_response(
        torch.randint(1, vocab, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long),
        torch.randint(1, vocab, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.long),
    )
    log_probs, _ = learner.token_stats(rows)
    assert seen and set(seen) == {expected}
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()


@pytest.mark.parametrize(("setting", "native", "expected"), [("auto", True, "bfloat16"), ("auto", False, "float32"),
                                                              ("float32", True, "float32"),
                                                              ("bfloat16", False, "bfloat16")])  # fmt: skip
def test_model_dtype_auto_is_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch, setting: str, native: bool,
                                                    expected: str) -> None:  # fmt: skip
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert precision.model_dtype(setting, CPU) == expected


def test_model_dtype_rejects_other_values() -> None:
    with pytest.raises(ValueError, match=r"model\.dtype"):
        precision.model_dtype("float16", CPU)


def test_quickstart_keeps_fp32_weights() -> None:
    """bf16 weights learn measurably less in the quickstart's SFT warm-up (bench/RESULTS.md, session 13): its
    weights stay fp32 (its bf16 products come from autocast: the test above)."""
    assert load_config("quickstart").model.dtype == "float32"


def test_no_autocast_over_bf16_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights (``model.dtype``) run as they are: autocast would only add casts; the fp32 module of the
    same config does autocast."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    config = load_config("grpo", ["model.path=tiny", "actor.autocast=auto"])
    for dtype, expected in ((torch.bfloat16, False), (torch.float32, True)):
        policy = FusedHeadPolicy(load_model("tiny", dtype=dtype)[0], packed=True)
        learner = PolicyLearner(config, policy, None, TorchBackend(policy, lr=1e-3, weight_decay=0.0, grad_clip=1.0),
                                None, True, CPU, 0, TokenMeter())  # fmt: skip
        assert learner.bf16_autocast is expected
        assert (learner.backend.master is not None) is (dtype == torch.bfloat16)
