"""Every config key is read by the engine: a key that validates but is never read is a silent no-op (a
user sets it and nothing changes). The config sections are made to record every attribute read; a tiny
1-step run (2 steps where replay is on) of every preset is made in both sample layouts through the CLI
(``spear train``), then ``spear eval``, plus one short run that switches on what no preset does (the
options below, each with the keys it reaches). The union of the keys read must be every key that
``spear presets --keys`` lists, except the short, explained allow-list."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from fault_helpers import TINY, FaultyLuckyEnv

from spear_engine.cli import main
from spear_engine.commands import describe_keys
from spear_engine.config import Section, SpearConfig
from spear_engine.config_loading import list_presets, load_config
from spear_engine.envs.base import Action, StepResult, register_env
from spear_engine.metrics import read_metrics
from spear_engine.train.backends import TorchBackend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NEVER_READ = {
    "description": "preset metadata: `spear presets` prints it from the preset file, the engine has no use for it",
    "replay.trajectory_score_threshold": "kept so official configs load; the official code never uses it",
}
"""Keys that no engine code reads, on purpose, with the reason."""

OPTION_RUN = [
    # one more run for the keys that only an option no preset turns on reads:
    "algorithm.use_kl_in_reward=true",  # algorithm.kl_coef, algorithm.kl_penalty
    "trainer.test_freq=1",  # trainer.val_before_train, trainer.val_greedy (the preset runs evaluate via `spear eval`)
    "actor.use_kl_loss=true",  # actor.kl_loss_type
    "actor.policy_loss.loss_mode=kl_cov",  # actor.policy_loss.kl_cov_ratio, ppo_kl_coef
    "rollout.rollout_is=token",  # rollout.rollout_is_threshold
    "trainer.backend=deepspeed",  # (the stand-in below)
    "trainer.deepspeed_offload=true",  # trainer.deepspeed_offload
]
REPLAY_STEPS = 2
"""Steps of the replay presets' step-layout runs: replay draws (which read replay.replay_draw / replay_mask)
need rows admitted at an earlier step."""


@register_env("keys_lucky")
class GoldLuckyEnv(FaultyLuckyEnv):
    """The fault tests' lucky game, plus a gold action that always wins (for the SFT warm-up)."""

    name = "keys_lucky"

    def step(self, action: Action) -> StepResult:
        result = super().step(action)
        if action.text == "jackpot":
            return StepResult(result.observation, 10.0, True, True, True)
        return result

    def gold_actions(self) -> list[Action]:
        return [Action("command", "jackpot")]


def schema_keys() -> set[str]:
    """The keys of `spear presets --keys` (its lines that are not documentation)."""
    return {line.split(" = ", 1)[0] for line in describe_keys(SpearConfig) if not line.startswith(" ")}


def _section_fields(
    model: type[BaseModel] = SpearConfig, prefix: str = ""
) -> dict[type, tuple[str, frozenset[str]]]:
    out = {model: (prefix, frozenset(model.model_fields))}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(_section_fields(field.annotation, f"{prefix}{name}."))
    return out


class KeyReads:
    """Records ``section.<field>`` reads of every config object (copies included) while installed."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.fields = _section_fields()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Record from now on, except while a config is validated (a key only a validator looks at is unused)."""
        import spear_engine.config_loading as loading

        original, validate = Section.__getattribute__, loading.validate_config
        fields, keys, paused = self.fields, self.keys, [False]

        def recording(obj: Any, name: str) -> Any:
            known = fields.get(type(obj))
            if known is not None and name in known[1] and not paused[0]:
                keys.add(known[0] + name)
            return original(obj, name)

        def validate_unrecorded(data: Any) -> SpearConfig:
            paused[0] = True
            try:
                return validate(data)
            finally:
                paused[0] = False

        monkeypatch.setattr(Section, "__getattribute__", recording)
        monkeypatch.setattr(loading, "validate_config", validate_unrecorded)


class VLLMStandIn:
    """Takes ``VLLMEngine``'s arguments (``spear-official`` uses vLLM) and generates with transformers, so the
    trainer's vLLM path runs without starting vLLM; what reaches ``vllm.LLM`` is tested in
    ``tests/rollout/test_vllm_engine_args.py``."""

    kwargs: ClassVar[dict[str, Any]] = {}

    def __new__(cls, model: str, **kwargs: Any) -> Any:
        from spear_engine.models import load_model
        from spear_engine.rollout.hf import HFEngine

        cls.kwargs = kwargs
        return HFEngine(load_model(model, dtype=kwargs.get("dtype", "float32"))[0], share=True)


class DeepSpeedStandIn(TorchBackend):
    """Takes ``DeepSpeedBackend``'s arguments and trains as the torch backend: ZeRO-3 needs torch.distributed
    and runs in ``tests/train/test_zero3_*.py``; here only the trainer's deepspeed path is wanted."""

    kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, module: Any, lr: float, weight_decay: float, grad_clip: float, **kwargs: Any) -> None:
        type(self).kwargs = kwargs
        super().__init__(module, lr, weight_decay, grad_clip)


@pytest.fixture(scope="module")
def reads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[frozenset[str]]:
    import spear_engine.plot
    import spear_engine.rollout.vllm
    import spear_engine.train.backends

    runs = [(preset, layout, []) for preset in list_presets() for layout in ("step", "trajectory")]
    runs.append(("grpo", "step", OPTION_RUN))
    # what the runs need to know of the presets, read before recording (our reads are not the engine's)
    presets = {preset: load_config(preset) for preset in list_presets()}
    replay_on = {name: c.replay.enable_trajectory_replay for name, c in presets.items()}
    sft_on = {name: c.trainer.sft_warmup_steps > 0 for name, c in presets.items()}
    gpu_share = presets["spear-official"].rollout.gpu_memory_utilization
    monkeypatch = pytest.MonkeyPatch()
    recorder = KeyReads()
    recorder.install(monkeypatch)
    monkeypatch.setattr(spear_engine.rollout.vllm, "VLLMEngine", VLLMStandIn)
    monkeypatch.setattr(spear_engine.train.backends, "DeepSpeedBackend", DeepSpeedStandIn)
    no_plot = lambda run_dir, out=None: Path(run_dir) / "curves.png"  # noqa: E731 (curves read no config)
    monkeypatch.setattr(spear_engine.plot, "plot_run", no_plot)  # saves ~1 s per run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("keys")
    tiny = [a for a in TINY if not a.startswith("env.name=")]
    common = [*tiny, "env.name=keys_lucky", f"trainer.output_dir={out}", "trainer.sft_episodes=4",
              "trainer.sft_rows_per_step=4", "replay.trajectory_buffer_size=2"]  # fmt: skip
    replayed = []
    try:
        for preset, layout, extra in runs:
            steps = REPLAY_STEPS if replay_on[preset] and layout == "step" else 1
            sft = ["trainer.sft_warmup_steps=1"] if sft_on[preset] else []  # quickstart
            name = f"{preset}-{layout}{'-options' if extra else ''}"
            args = ["train", "--preset", preset, "--no-progress", *common, f"rollout.layout={layout}",
                    f"trainer.total_training_steps={steps}", f"trainer.run_name={name}", *sft, *extra]  # fmt: skip
            assert main(["--debug", *args]) == 0, args
            replayed += [r.get("replay/drawn_rows", 0.0) for r in read_metrics(out / name)]
        assert main(["--debug", "eval", "--run-dir", str(out / "spear-official-step")]) == 0
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    assert max(replayed) > 0, "no run drew a replay batch: the replay draw's keys went unchecked"
    assert VLLMStandIn.kwargs["gpu_memory_utilization"] == gpu_share
    assert DeepSpeedStandIn.kwargs["offload"] is True
    yield frozenset(recorder.keys)  # a copy taken with the recorder off: the test's own reads do not count


def test_every_config_key_is_read_on_some_preset_path(reads: frozenset[str]) -> None:
    keys = schema_keys()
    assert set(NEVER_READ) <= keys, "an allow-listed key is no longer a config key: drop it from NEVER_READ"
    unread = keys - reads - set(NEVER_READ)
    assert not unread, (
        f"config keys never read by any preset run (validated, then silently ignored): {sorted(unread)}. "
        "Implement them, remove them, or (if read only off these paths) cover them with an option run here."
    )
    assert not set(NEVER_READ) & reads, f"allow-listed keys are read after all: {sorted(set(NEVER_READ) & reads)}"


def test_the_recorder_sees_reads_of_copies_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    import spear_engine.config_loading as loading

    config = SpearConfig()
    recorder = KeyReads()
    recorder.install(monkeypatch)
    copy = config.model_copy(update={"trainer": config.trainer.model_copy(update={"resume": "none"})})
    assert copy.trainer.resume == "none" and copy.data.val_batch_size == 128
    config.model_dump()  # a dump (checkpoints, config.yaml) is not a use
    loading.validate_config({"rollout": {"rollout_filter_ratio": 0.5}})  # nor is validation
    assert recorder.keys == {"trainer", "trainer.resume", "data", "data.val_batch_size"}
