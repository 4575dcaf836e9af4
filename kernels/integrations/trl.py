"""TRL's ``GRPOTrainer`` computing its per-token log-probs and entropies through spear_kernels (trl 1.16).

How TRL 1.16 computes them: ``GRPOTrainer.__init__`` patches the policy (and the reference model) with
``trl.trainer.utils.add_fused_lm_head``, and ``GRPOTrainer._get_per_token_logps_and_entropies`` calls
``model(input_ids=..., attention_mask=..., labels=labels, fused_lm_head=True)`` per ``batch_size`` rows,
with ``labels`` = the input ids, -100 on padding and on everything before the last ``logits_to_keep``
(completion) tokens. The patched forward runs the backbone, then TRL's ``ChunkedLogProbFunction`` on the
lm_head, and returns a ``FusedCausalLMOutput`` (``log_probs`` / ``entropy``: [B, T - 1] fp32, 0 where the
label is -100). On a CPU, TRL's head scores every position (prompt and padding included) through fp32
tiles of 4,096 tokens × 32,768 vocabulary entries and their softmax temporaries.

Here the same forward protocol is served by :func:`~spear_kernels.linear_logprob_entropy` on the labelled
positions only (one chunk of logits at a time, 128 MB fp32 / 192 MB bf16 by default on CPU; Triton on
CUDA). Everything else stays TRL's own: the chunking by ``batch_size``, ``logits_to_keep``, ``compute_entropy``, the temperature,
the loss, the reference model, PEFT and the accelerate / DDP wrappers (the head lives in the wrapped
model's forward, so wrappers see an ordinary forward). Outputs have TRL's shapes and dtypes.

    from spear_kernels.integrations.trl import SpearGRPOTrainer      # a GRPOTrainer, same arguments
    trainer = SpearGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)
    trainer.train()
    # or, for a GRPOTrainer (or subclass) that already exists:  patch_grpo_trainer(trainer)

Refused with a clear error (rather than computed differently from TRL): multimodal inputs (``pixel_values``
and friends: not tested), heads that soft-cap their logits (Gemma 2/3), per-token outputs other than
``log_probs`` / ``entropy``, and DeepSpeed ZeRO-3 (the backward re-reads the lm_head weight outside the
module's gather hooks). MoE load-balancing losses are computed as TRL computes them.

This module imports ``trl`` (and ``transformers``); ``spear_kernels`` itself never does.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Any

import torch
from torch.distributed.tensor import DTensor

try:
    import trl
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spear_kernels.integrations.trl needs TRL (tested with trl 1.16.0: pip install trl==1.16.0); "
        "spear_kernels itself does not"
    ) from e

from ..linear_logprob_entropy import linear_logprob_entropy
from ..modules import head_operands, no_autocast
from ..utils import Backend

try:  # TRL's own output type, so callers (and TRL's trainers) cannot tell the two heads apart
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as e:  # pragma: no cover - TRL before the fused LM head
    raise ImportError(
        "spear_kernels.integrations.trl needs trl >= 1.16 (the fused LM head protocol); "
        f"found trl {trl.__version__}"
    ) from e

TESTED_TRL = "1.16"
if not trl.__version__.startswith(TESTED_TRL):  # pragma: no cover - depends on the environment
    warnings.warn(
        f"spear_kernels.integrations.trl is tested with trl {TESTED_TRL}.x; found {trl.__version__}. It "
        "overrides GRPOTrainer's fused LM head (model(..., labels=..., fused_lm_head=True)); check that this "
        "protocol is unchanged.",
        stacklevel=2,
    )

#: Per-token fields of TRL's ``FusedCausalLMOutput`` this head computes; TRL's others
#: (``log_sum_sq_probs``, ``mean_logits``, ``is_top1``) are refused.
SUPPORTED_OUTPUTS = ("log_probs", "entropy")
#: Keyword arguments of ``_get_per_token_logps_and_entropies`` / the model forward that carry images.
MULTIMODAL_KWARGS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip
_MARK = "_spear_lm_head"  # set on a patched model: the settings its head runs with


def _logit_scale(text_config: Any) -> float:
    """The factor between ``lm_head(h)`` and the model's logits, looked up exactly as TRL 1.16's
    ``add_fused_lm_head`` does (Cohere ``logit_scale``, ``output_multiplier``, Falcon-H1
    ``lm_head_multiplier``, Granite / MiniCPM3 ``1 / logits_scaling``, HyperCLOVA X ``logits_scaling``)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / scaling
    scale = 1.0 if scale is None else float(scale)
    if scale <= 0:
        raise NotImplementedError(f"logit scale {scale} <= 0: the fused head needs a positive logit scale")
    return scale


def _refuse_multimodal(kwargs: dict[str, Any]) -> None:
    given = [k for k in MULTIMODAL_KWARGS if kwargs.get(k) is not None]
    if given:
        raise NotImplementedError(
            f"spear_kernels' TRL head supports text-only causal LMs; got multimodal inputs {given}. Train "
            "vision-language models with TRL's own GRPOTrainer (its fused LM head handles them)."
        )


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def add_spear_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> None:
    """Drop-in for ``trl.trainer.utils.add_fused_lm_head``: afterwards ``model(..., labels=labels,
    fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``, computed by spear_kernels.

    Same arguments and meaning as TRL's (``outputs`` ⊆ ("log_probs", "entropy"); log-probs are always
    computed and the entropy costs nothing extra, it is returned when asked for), plus ``chunk_size`` and
    ``backend`` of :func:`~spear_kernels.linear_logprob_entropy`. Calls without ``fused_lm_head=True``
    (generation) go to the forward the model had before, unchanged. Patching again replaces the spear head.
    """
    bad = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if bad:
        raise ValueError(f"spear_kernels' TRL head computes {SUPPORTED_OUTPUTS}, not {bad}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{type(model).__name__} soft-caps its logits (final_logit_softcapping): spear_kernels computes "
            "log-probs of the raw lm_head logits; keep TRL's own head for this model"
        )
    inv_scale_t = temperature / _logit_scale(text_config)  # logits = scale · lm_head(h) / T
    mark = getattr(model, _MARK, None)
    previous = mark["previous_forward"] if mark else model.forward  # TRL's fused forward, or the plain one
    want_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def _spear_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return previous(*args, **kwargs)
        _refuse_multimodal(kwargs)
        if _zero3():
            raise NotImplementedError(
                "spear_kernels' TRL head does not support DeepSpeed ZeRO-3 (its backward reads the lm_head "
                "weight outside the module's gather hooks); use ZeRO-1/2, FSDP or TRL's own head"
            )
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):  # as TRL: MoE router logits when asked
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = self.base_model(*args, **kwargs)  # looked up per call: FSDP / PEFT replace modules
        if shift_labels is None:
            hidden = backbone_outputs.last_hidden_state[:, :-1]
            labels = labels[:, 1:]
        else:
            hidden = backbone_outputs.last_hidden_state
            labels = shift_labels
        head = self.get_output_embeddings()
        hidden = hidden.to(head.weight.device)
        labels = labels.to(head.weight.device)
        mask = labels != -100
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2: gather the head, as TRL does
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        rows = hidden[mask]
        if cast_lm_head_to_fp32:
            x, w, b = rows.float(), weight.float(), None if bias is None else bias.float()
        else:  # the autocast dtype when autocast is on (TRL's compute dtype), else the hidden states' dtype
            x, w, b = head_operands(rows, weight, bias)
        if rows.shape[0]:
            with no_autocast(x):
                lp, ent = linear_logprob_entropy(
                    x, w, labels[mask], bias=b, temperature=inv_scale_t, chunk_size=chunk_size,
                    backend=backend,
                )
        else:  # no label at all: a differentiable zero, so backward() still runs (as TRL's head gives)
            lp = ent = (0.0 * x.sum(dtype=torch.float32) + 0.0 * w.sum(dtype=torch.float32)).expand(0)
        zeros = mask.new_zeros(mask.shape, dtype=torch.float32)
        log_probs = zeros.masked_scatter(mask, lp)
        entropy = zeros.masked_scatter(mask, ent) if want_entropy else None
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask, aux_loss=aux_loss
        )

    model.forward = types.MethodType(_spear_forward, model)
    settings = {"previous_forward": previous, "temperature": temperature, "outputs": tuple(outputs),
                "cast_lm_head_to_fp32": cast_lm_head_to_fp32, "chunk_size": chunk_size, "backend": backend}
    setattr(model, _MARK, settings)


def _load_balancing_loss(
    model: Any, text_config: Any, backbone_outputs: Any, attention_mask: Any
) -> torch.Tensor:
    """The MoE load-balancing loss, as TRL 1.16's fused head computes it (Mixtral's function)."""
    import transformers
    from packaging.version import Version
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if Version(transformers.__version__) < Version("5.0.0") or (
        text_config.model_type == "gpt_oss" and Version(transformers.__version__) < Version("5.6.0")
    ):
        num_experts, per_tok = model.num_experts, model.num_experts_per_tok
    else:
        num_experts, per_tok = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, per_tok, attention_mask)


def _inner(model: torch.nn.Module, trainer: GRPOTrainer) -> torch.nn.Module:
    """The module whose ``forward`` TRL patches: the model without accelerate / DDP / DeepSpeed wrappers and
    without PEFT's wrapper (as ``GRPOTrainer.__init__`` does)."""
    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch_grpo_trainer(
    trainer: GRPOTrainer, *, chunk_size: int | None = None, backend: Backend = "auto"
) -> GRPOTrainer:
    """Make an existing ``GRPOTrainer`` (or subclass) compute its per-token log-probs and entropies through
    spear_kernels: the policy's and the reference model's fused LM heads are replaced, with the trainer's
    temperature and ``cast_lm_head_to_fp32``. Returns ``trainer``. Call it before ``trainer.train()``."""
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch_grpo_trainer takes a trl GRPOTrainer, got {type(trainer).__name__}")
    cast = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    common = {"temperature": trainer.temperature, "cast_lm_head_to_fp32": cast, "chunk_size": chunk_size,
              "backend": backend}  # fmt: skip
    add_spear_lm_head(_inner(trainer.model, trainer), outputs=("log_probs", "entropy"), **common)
    if trainer.ref_model is not None:
        add_spear_lm_head(_inner(trainer.ref_model, trainer), outputs=("log_probs",), **common)
    return trainer


def uses_spear_head(model: torch.nn.Module) -> bool:
    """Whether ``model`` (wrapped or not) computes TRL's fused log-probs through spear_kernels."""
    while True:
        if getattr(model, _MARK, None):
            return True
        inner = getattr(model, "module", None)
        if inner is None and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if inner is None or inner is model:
            return False
        model = inner


class SpearGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies (policy, old and reference log-probs,
    the entropy metric, mask and bonus) come from spear_kernels: no [tokens, vocabulary] logits, only the
    completion tokens scored. Same arguments as ``GRPOTrainer``, plus keyword-only ``spear_chunk_size``
    (tokens per logits chunk; default a 128 MB fp32 / 192 MB bf16 budget on CPU) and ``spear_backend``
    ("auto" | "torch" | "triton")."""

    def __init__(self, *args: Any, spear_chunk_size: int | None = None, spear_backend: Backend = "auto",
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        patch_grpo_trainer(self, chunk_size=spear_chunk_size, backend=spear_backend)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        """TRL's method (chunks of ``batch_size`` rows, ``logits_to_keep``, ``compute_entropy``,
        ``compute_aux_loss``), checked first: text-only inputs, and a model that carries spear's head."""
        _refuse_multimodal(kwargs)
        if not uses_spear_head(model):
            raise RuntimeError(
                f"{type(model).__name__} does not carry spear_kernels' head (was the model replaced after "
                "the trainer was built?): call spear_kernels.integrations.trl.patch_grpo_trainer(trainer)"
            )
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )


__all__ = [
    "MULTIMODAL_KWARGS",
    "SUPPORTED_OUTPUTS",
    "SpearGRPOTrainer",
    "add_spear_lm_head",
    "patch_grpo_trainer",
    "uses_spear_head",
]
