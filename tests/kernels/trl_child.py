"""Child process of tests/kernels/test_trl_integration.py, run by the TRL venv's python (trl 1.16), with
spear_kernels installed alone on its PYTHONPATH. Offline: tiny Llama models built from a config, a
byte-level tokenizer built in memory. Prints one JSON line (the last line of stdout).

    python trl_child.py equivalence --dtype float32|bfloat16 --workdir DIR
    python trl_child.py memory --variant trl|spear --vocab 49152 --rows 8 --completion 1024 --workdir DIR
    python trl_child.py train --steps 2 --workdir DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import spear_kernels  # noqa: E402
import spear_kernels.integrations.trl as spear_trl  # noqa: E402

transformers.logging.set_verbosity_error()
_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer() -> Any:
    """A byte-level ChatML tokenizer (259 ids), no download. The same as spear_engine.models.byte_tokenizer,
    written again because this child runs in the TRL venv, where only spear_kernels is installed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=_CHATML)


def tiny_model(vocab: int, hidden: int = 48, layers: int = 2, seed: int = 0, tie: bool = False) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    if not tie:  # spread-out logits: entropies and log-probs far from uniform
        torch.nn.init.normal_(model.lm_head.weight, std=0.5 / hidden**0.5 * 4)
    return model


def save_model(path: Path, vocab: int, tie: bool = False) -> str:
    model = tiny_model(vocab, tie=tie)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def dataset(n: int = 8) -> Any:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rows = [{"prompt": [{"role": "user", "content": f"say {words[i % 8]} {i}"}]} for i in range(n)]
    return Dataset.from_list(rows)


def reward_len(completions: list[Any], **_: Any) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 5) + 0.1 * float(sum(map(ord, t)) % 7) for t in texts]


def config(workdir: Path, **kw: Any) -> GRPOConfig:
    base: dict[str, Any] = {
        "output_dir": str(workdir / "out"), "per_device_train_batch_size": 4, "num_generations": 2,
        "max_completion_length": 8, "learning_rate": 1e-3, "beta": 0.0, "report_to": "none",
        "save_strategy": "no", "logging_steps": 1, "use_cpu": True, "seed": 0, "disable_tqdm": True,
        "dataloader_num_workers": 0, "shuffle_dataset": False,
    }  # fmt: skip
    base.update(kw)
    return GRPOConfig(**base)


class Counter:
    """Counts calls of spear_kernels' lm_head kernel made by the integration (its module global)."""

    def __init__(self) -> None:
        self.calls = 0
        self._orig = spear_trl.linear_logprob_entropy

        def counted(*a: Any, **k: Any) -> Any:
            self.calls += 1
            return self._orig(*a, **k)

        spear_trl.linear_logprob_entropy = counted


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def absmax(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.double() - b.double()).abs()
    return (d[mask.bool()] if mask is not None else d).max().item()


# ---------------------------------------------------------------------------------------------
# A: same log-probs, entropies, GRPO loss and gradients as TRL's own head


def make_inputs(vocab: int, rows: int, prompt: int, completion: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (rows, prompt), generator=g)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    completion_ids = torch.randint(3, vocab, (rows, completion), generator=g)
    completion_mask = torch.ones(rows, completion, dtype=torch.long)
    for r in range(rows):  # left-padded prompts, completions ending early (eos, then padding)
        pad = int(torch.randint(0, prompt // 2 + 1, (1,), generator=g))
        prompt_ids[r, :pad], prompt_mask[r, :pad] = 2, 0
        stop = int(torch.randint(completion // 3, completion + 1, (1,), generator=g))
        if stop < completion:
            completion_ids[r, stop] = 2
            completion_ids[r, stop + 1 :], completion_mask[r, stop + 1 :] = 2, 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": torch.randn(rows, generator=g)}  # fmt: skip


def _sequence(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion ids and their attention mask, as GRPOTrainer feeds the model."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    return ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)


def _loss_and_grads(t: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One GRPO loss of trainer ``t`` on ``inputs`` (no accumulation), backpropagated: the loss and a copy
    of every parameter's gradient."""
    t.current_gradient_accumulation_steps = 1
    t.model.zero_grad(set_to_none=True)
    loss = t._compute_loss(t.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None}


def _trainer(cls: Any, path: str, workdir: Path, **kw: Any) -> Any:
    return cls(model=path, reward_funcs=reward_len, args=config(workdir, **kw), train_dataset=dataset(),
               processing_class=byte_tokenizer())  # fmt: skip


def _equivalence(dtype_name: str, seed: int, loss_type: str, workdir: Path, counter: Counter) -> dict[str, Any]:
    dtype = getattr(torch, dtype_name)
    vocab, rows, prompt, completion, temperature = 331, 6, 7, 19, 0.7
    path = save_model(workdir / "model", vocab)
    kw = {"temperature": temperature, "beta": 0.04, "entropy_coef": 0.01, "epsilon_high": 0.28,
          "bf16": dtype == torch.bfloat16, "model_init_kwargs": {"dtype": dtype_name}, "loss_type": loss_type}  # fmt: skip
    trainers = {"trl": _trainer(GRPOTrainer, path, workdir / "a", **kw),
                "spear": _trainer(spear_trl.SpearGRPOTrainer, path, workdir / "b", **kw),
                "patched": spear_trl.patch_grpo_trainer(_trainer(GRPOTrainer, path, workdir / "c", **kw))}  # fmt: skip
    out: dict[str, Any] = {
        "uses_spear_head": {k: spear_trl.uses_spear_head(t.model) for k, t in trainers.items()},
        "ref_uses_spear_head": {k: spear_trl.uses_spear_head(t.ref_model) for k, t in trainers.items()},
    }
    inputs = make_inputs(vocab, rows, prompt, completion, seed)
    ids, att = _sequence(inputs)
    cmask = inputs["completion_mask"]
    res: dict[str, dict[str, Any]] = {}
    for name, t in trainers.items():
        t.model.train()
        before = counter.calls
        lp, ent, aux = t._get_per_token_logps_and_entropies(t.model, ids, att, completion, batch_size=4,
                                                            compute_entropy=True)  # fmt: skip
        lp2, ent2, _ = t._get_per_token_logps_and_entropies(t.model, ids, att, completion, batch_size=None)
        with torch.no_grad():
            ref_lp, _, _ = t._get_per_token_logps_and_entropies(t.ref_model, ids, att, completion, batch_size=5)
        res[name] = {"lp": lp.detach(), "ent": ent.detach(), "lp2": lp2.detach(), "ref_lp": ref_lp, "aux": aux,
                     "ent2_is_none": ent2 is None, "kernel_calls": counter.calls - before}  # fmt: skip
    # old log-probs a little off the current policy (ratios clipped on both sides); the reference's from TRL
    g = torch.Generator().manual_seed(seed + 1)
    old = res["trl"]["lp"] + 0.3 * torch.randn(res["trl"]["lp"].shape, generator=g)
    args = trainers["trl"].args
    old = res["trl"]["lp"] - _off_clip_edges(res["trl"]["lp"] - old, args.epsilon, args.epsilon_high)
    inputs.update({"old_per_token_logps": old * cmask, "ref_per_token_logps": res["trl"]["ref_lp"],
                   "num_items_in_batch": cmask.sum()})  # fmt: skip
    for name, t in trainers.items():
        before = counter.calls
        loss, grads = _loss_and_grads(t, inputs)
        res[name].update({"loss": loss.double().item(), "loss_dtype": str(loss.dtype),
                          "loss_kernel_calls": counter.calls - before, "grads": grads})  # fmt: skip
    # the exact head in float64 from the hidden states both heads receive (the backbone is the same code)
    m, tr = trainers["trl"].model, trainers["trl"]
    with torch.no_grad(), tr.accelerator.autocast():
        hs = m.base_model(input_ids=ids, attention_mask=att).last_hidden_state[:, -completion - 1 : -1]
    head_dtype = torch.bfloat16 if dtype == torch.bfloat16 else m.lm_head.weight.dtype
    z = hs.to(head_dtype).double() @ m.lm_head.weight.to(head_dtype).double().T / temperature
    logp_all = z.log_softmax(-1)
    exact_lp = logp_all.gather(-1, inputs["completion_ids"][..., None])[..., 0] * cmask
    exact_ent = -(logp_all.exp() * logp_all).sum(-1) * cmask
    a, b = res["spear"], res["trl"]
    out.update({
        "shape": {k: list(r["lp"].shape) for k, r in res.items()},
        "ent_shape": {k: list(r["ent"].shape) for k, r in res.items()},
        "dtype_lp": {k: str(r["lp"].dtype) for k, r in res.items()},
        "dtype_ent": {k: str(r["ent"].dtype) for k, r in res.items()},
        "ent_none_without_compute_entropy": {k: r["ent2_is_none"] for k, r in res.items()},
        "aux_none": {k: r["aux"] is None for k, r in res.items()},
        "kernel_calls": {k: r["kernel_calls"] for k, r in res.items()},
        "loss_kernel_calls": {k: r["loss_kernel_calls"] for k, r in res.items()},
        "zero_on_padding": {k: bool((r["lp"][cmask == 0] == 0).all() and (r["ent"][cmask == 0] == 0).all())
                            for k, r in res.items()},
        "lp_abs": absmax(a["lp"], b["lp"], cmask), "ent_abs": absmax(a["ent"], b["ent"], cmask),
        "lp_nobatch_abs": absmax(a["lp2"], b["lp2"], cmask),
        "ref_lp_abs": absmax(a["ref_lp"], b["ref_lp"], cmask),
        "patched_equal": bool(torch.equal(res["patched"]["lp"], a["lp"])
                              and torch.equal(res["patched"]["ent"], a["ent"])),
        "lp_vs_exact": {k: absmax(r["lp"], exact_lp, cmask) for k, r in res.items()},
        "ent_vs_exact": {k: absmax(r["ent"], exact_ent, cmask) for k, r in res.items()},
        "max_abs_logit": z.abs().max().item(), "temperature": temperature,
        "loss": {k: r["loss"] for k, r in res.items()}, "loss_dtype": {k: r["loss_dtype"] for k, r in res.items()},
        "loss_rel": abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12),
        "loss_abs": abs(a["loss"] - b["loss"]), "adv_scale": inputs["advantages"].abs().mean().item(),
        "grad_count": {k: len(r["grads"]) for k, r in res.items()},
        "grad_rel": {n: rel(a["grads"][n], b["grads"][n]) for n in b["grads"]},
        "patched_grad_rel": max(rel(res["patched"]["grads"][n], a["grads"][n]) for n in a["grads"]),
    })  # fmt: skip
    out["grad_rel_max"] = max(out["grad_rel"].values())
    if dtype == torch.bfloat16:  # how far each bf16 head is from the same weights run in float32
        out.update(_vs_float32(trainers["trl"], path, workdir / "fp32", kw, inputs, res))
    # a micro-batch without a single completion token (all padding) still backpropagates, as with TRL's head
    t = trainers["spear"]
    empty = att.clone()
    empty[:, -completion:] = 0
    lp0, ent0, _ = t._get_per_token_logps_and_entropies(t.model, ids, empty, completion, compute_entropy=True)
    (lp0.sum() + ent0.sum()).backward()
    out["all_masked_ok"] = bool(lp0.abs().sum() == 0 and lp0.requires_grad)
    return out


# log-ratios closer than this to a clip edge are moved off it: a token whose ratio sits on the edge is clipped
# by one head and not the other when their log-probs differ by a bf16 rounding (~0.02), which switches its
# whole gradient on or off (a discontinuity, not an error of either head)
CLIP_EDGE_MARGIN = 0.1


def _off_clip_edges(log_ratio: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    out = log_ratio.clone()
    for edge in (math.log(1 - eps_low), math.log(1 + eps_high)):
        near = (out - edge).abs() < CLIP_EDGE_MARGIN
        out[near] = torch.where(out[near] < edge, edge - CLIP_EDGE_MARGIN, edge + CLIP_EDGE_MARGIN)
    return out


def _vs_float32(bf16_trainer: Any, path: str, workdir: Path, kw: dict[str, Any], inputs: dict[str, Any],
               res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Loss and gradients of TRL's head in float32 on the bf16 weights (upcast): the reference that both bf16
    heads are measured against, since two bf16 computations differ from each other by their rounding."""
    t = _trainer(GRPOTrainer, path, workdir, **{**kw, "bf16": False, "model_init_kwargs": {"dtype": "float32"}})
    with torch.no_grad():
        for p, q in zip(t.model.parameters(), bf16_trainer.model.parameters(), strict=True):
            p.copy_(q.float())
    loss, ref = _loss_and_grads(t, inputs)
    ref_loss = loss.double().item()
    names = ("trl", "spear")
    return {"grad_vs_fp32": {k: max(rel(res[k]["grads"][n], ref[n]) for n in ref) for k in names},
            "loss_vs_fp32": {k: abs(res[k]["loss"] - ref_loss) / max(abs(ref_loss), 1e-12) for k in names}}


def _moe(workdir: Path, counter: Counter) -> dict[str, Any]:
    """A tiny Mixtral (router logits on): the load-balancing loss and log-probs as TRL's head gives them."""
    torch.manual_seed(3)
    config_ = transformers.MixtralConfig(
        vocab_size=131, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        output_router_logits=True, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    transformers.MixtralForCausalLM(config_).save_pretrained(workdir / "moe")
    byte_tokenizer().save_pretrained(workdir / "moe")
    inputs = make_inputs(131, 4, 5, 9, 5)
    ids, att = _sequence(inputs)
    got = {}
    for name, cls in (("trl", GRPOTrainer), ("spear", spear_trl.SpearGRPOTrainer)):
        t = _trainer(cls, str(workdir / "moe"), workdir / f"moe-{name}", bf16=False)
        lp, ent, aux = t._get_per_token_logps_and_entropies(t.model, ids, att, 9, compute_entropy=True,
                                                            compute_aux_loss=t.aux_loss_enabled)  # fmt: skip
        got[name] = (lp.detach(), ent.detach(), aux, t.aux_loss_enabled)
    a, b = got["spear"], got["trl"]
    return {"aux_enabled": [a[3], b[3]], "aux": [None if x[2] is None else x[2].item() for x in (a, b)],
            "lp_abs": absmax(a[0], b[0], inputs["completion_mask"]),
            "ent_abs": absmax(a[1], b[1], inputs["completion_mask"])}  # fmt: skip


def _cast_fp32(workdir: Path, counter: Counter) -> dict[str, Any]:
    """bf16 model and autocast with GRPOConfig(cast_lm_head_to_fp32=True): both heads run in fp32."""
    path = save_model(workdir / "cast-model", 331)
    inputs = make_inputs(331, 4, 5, 9, 9)
    ids, att = _sequence(inputs)
    got = {}
    for name, cls in (("trl", GRPOTrainer), ("spear", spear_trl.SpearGRPOTrainer)):
        t = _trainer(cls, path, workdir / f"cast-{name}", bf16=True, cast_lm_head_to_fp32=True,
                     model_init_kwargs={"dtype": "bfloat16"})  # fmt: skip
        t.model.train()
        before = counter.calls
        with t.accelerator.autocast():
            lp, ent, _ = t._get_per_token_logps_and_entropies(t.model, ids, att, 9, compute_entropy=True)
        (lp * inputs["completion_mask"]).sum().backward()
        got[name] = {"lp": lp.detach(), "ent": ent.detach(), "calls": counter.calls - before,
                     "head_dtype": str(t.model.lm_head.weight.dtype),
                     "grads": {n: p.grad.float() for n, p in t.model.named_parameters() if p.grad is not None}}  # fmt: skip
    a, b = got["spear"], got["trl"]
    return {"head_dtype": [a["head_dtype"], b["head_dtype"]], "kernel_calls": [a["calls"], b["calls"]],
            "lp_abs": absmax(a["lp"], b["lp"], inputs["completion_mask"]),
            "ent_abs": absmax(a["ent"], b["ent"], inputs["completion_mask"]),
            "grad_rel_max": max(rel(a["grads"][n], b["grads"][n]) for n in b["grads"])}  # fmt: skip


def _peft(workdir: Path, counter: Counter) -> dict[str, Any]:
    """LoRA through TRL's peft_config: TRL patches the wrapped model (get_base_model()), and so does spear."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return {"skipped": "peft is not installed in the TRL venv (bash bench/trl_env.sh adds it)"}
    from peft import LoraConfig

    path = save_model(workdir / "peft-model", 331)
    inputs = make_inputs(331, 4, 5, 9, 7)
    ids, att = _sequence(inputs)
    got = {}
    for name, cls in (("trl", GRPOTrainer), ("spear", spear_trl.SpearGRPOTrainer)):
        torch.manual_seed(0)  # the same LoRA initialisation
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights="gaussian", task_type="CAUSAL_LM")  # fmt: skip
        t = cls(model=path, reward_funcs=reward_len, args=config(workdir / f"peft-{name}", bf16=False),
                train_dataset=dataset(), processing_class=byte_tokenizer(), peft_config=lora)  # fmt: skip
        t.model.train()
        before = counter.calls
        lp, ent, _ = t._get_per_token_logps_and_entropies(t.model, ids, att, 9, compute_entropy=True)
        (lp * inputs["completion_mask"]).sum().backward()
        got[name] = {"lp": lp.detach(), "ent": ent.detach(), "calls": counter.calls - before,
                     "uses": spear_trl.uses_spear_head(t.model), "type": type(t.model).__name__,
                     "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}}  # fmt: skip
    a, b = got["spear"], got["trl"]
    return {"model_type": b["type"], "uses_spear_head": [a["uses"], b["uses"]], "kernel_calls": [a["calls"], b["calls"]],
            "lp_abs": absmax(a["lp"], b["lp"], inputs["completion_mask"]),
            "ent_abs": absmax(a["ent"], b["ent"], inputs["completion_mask"]), "grad_count": len(b["grads"]),
            "grad_rel_max": max(rel(a["grads"][n], b["grads"][n]) for n in b["grads"])}  # fmt: skip


def _refusals(counter: Counter) -> dict[str, str]:
    out = {}
    model = tiny_model(97)
    spear_trl.add_spear_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(3, 97, (2, 9))
    try:
        model(input_ids=ids, labels=ids, fused_lm_head=True, pixel_values=torch.zeros(2, 3, 4, 4))
    except NotImplementedError as e:
        out["pixel_values"] = str(e)
    try:
        spear_trl.add_spear_lm_head(tiny_model(97), outputs=("log_probs", "is_top1"))
    except ValueError as e:
        out["is_top1"] = str(e)
    capped = tiny_model(97)
    capped.config.final_logit_softcapping = 30.0
    try:
        spear_trl.add_spear_lm_head(capped)
    except NotImplementedError as e:
        out["softcap"] = str(e)
    # generation (no fused_lm_head) still goes through the model's own forward
    plain = model(input_ids=ids)
    out["plain_forward_has_logits"] = str(getattr(plain, "logits", None) is not None)
    return out


def cmd_equivalence(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    counter = Counter()
    out: dict[str, Any] = {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__, "spear_kernels_file": spear_kernels.__file__,
                           "seed": args.seed, "loss_type": args.loss_type}  # fmt: skip
    for name in args.dtype.split(","):
        out[name] = _equivalence(name, args.seed, args.loss_type, Path(args.workdir) / name, counter)
    out["moe"] = _moe(Path(args.workdir), counter)
    out["peft"] = _peft(Path(args.workdir), counter)
    out["cast_lm_head_to_fp32"] = _cast_fp32(Path(args.workdir), counter)
    out["refusals"] = _refusals(counter)
    return out


# ---------------------------------------------------------------------------------------------
# B: peak memory of the log-prob computation (forward + backward), one variant per fresh process


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> int:
    """Resets the kernel's peak-RSS counter (VmHWM) to the current RSS; returns that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status()["VmRSS"]


def cmd_memory(args: argparse.Namespace) -> dict[str, Any]:
    vocab, rows, prompt, completion = args.vocab, args.rows, args.prompt, args.completion
    model = tiny_model(vocab, hidden=args.hidden, layers=1)
    cls = spear_trl.SpearGRPOTrainer if args.variant == "spear" else GRPOTrainer
    cfg = config(Path(args.workdir), gradient_checkpointing=False, bf16=args.precision == "bf16-autocast")
    trainer = cls(model=model, reward_funcs=reward_len, args=cfg, train_dataset=dataset(),
                  processing_class=byte_tokenizer())  # fmt: skip
    model = trainer.model
    model.train()
    g = torch.Generator().manual_seed(0)

    def step(r: int, p: int, c: int, measure: bool) -> dict[str, float]:
        ids = torch.randint(3, vocab, (r, p + c), generator=g)
        att = torch.ones_like(ids)
        adv = torch.randn(r, 1, generator=g)
        out: dict[str, float] = {}
        base = _reset_peak() if measure else 0
        t0 = time.perf_counter()
        lp, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, c, compute_entropy=True)
        if measure:
            out["forward_peak"], out["forward_s"] = _status()["VmHWM"] - base, time.perf_counter() - t0
            out["entropy_mean"] = ent.mean().item()
            if args.forward_only:
                return out
            _reset_peak()
        t1 = time.perf_counter()
        loss = -(torch.exp(lp - lp.detach()) * adv).mean()  # the GRPO surrogate on-policy; entropy: a metric
        loss.backward()
        if measure:
            out["backward_peak"], out["backward_s"] = _status()["VmHWM"] - base, time.perf_counter() - t1
        return out

    step(2, 8, 16, measure=False)  # warm-up: lazy initialisations, allocator pools
    model.zero_grad(set_to_none=True)
    gc.collect()
    res = step(rows, prompt, completion, measure=True)
    res["peak"] = max(res["forward_peak"], res.get("backward_peak", 0))
    return {"variant": args.variant, "precision": args.precision, "vocab": vocab, "hidden": args.hidden,
            "rows": rows, "prompt": prompt, "completion": completion, "scored_tokens": rows * completion,
            "threads": torch.get_num_threads(), **res}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# C: a few GRPOTrainer training steps through spear's head


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    path = save_model(Path(args.workdir) / "model", 320)
    counter = Counter()
    stub_calls = []

    class NoTrlHead:  # TRL's own chunked head must never run
        @staticmethod
        def apply(*a: Any, **k: Any) -> Any:
            stub_calls.append(1)
            raise AssertionError("TRL's ChunkedLogProbFunction ran")

    import trl.trainer.utils as trl_utils

    trl_utils._ChunkedLogProbFunction = NoTrlHead
    cfg = config(Path(args.workdir), max_steps=args.steps, beta=0.04, temperature=0.9, entropy_coef=0.01,
                 num_iterations=2, gradient_accumulation_steps=2)  # fmt: skip
    trainer = spear_trl.SpearGRPOTrainer(model=path, reward_funcs=reward_len, args=cfg, train_dataset=dataset(),
                                         processing_class=byte_tokenizer())  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    t0 = time.perf_counter()
    trainer.train()
    after = dict(trainer.model.named_parameters())
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": time.perf_counter() - t0, "global_step": trainer.state.global_step,
        "losses": [h["loss"] for h in history], "entropy": [h.get("entropy") for h in history],
        "kl": [h.get("kl") for h in history], "rewards": [h.get("reward") for h in history],
        "changed": sum(not torch.equal(before[n], after[n].detach()) for n in before), "params": len(before),
        "max_change": max((before[n] - after[n].detach()).abs().max().item() for n in before),
        "kernel_calls": counter.calls, "trl_head_calls": len(stub_calls),
        "uses_spear_head": spear_trl.uses_spear_head(trainer.model),
        "ref_uses_spear_head": spear_trl.uses_spear_head(trainer.ref_model),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["equivalence", "memory", "train"])
    p.add_argument("--workdir", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["trl", "spear"], default="spear")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=24)
    p.add_argument("--completion", type=int, default=1024)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16-autocast"], default="fp32",
                   help="memory: fp32, or GRPOConfig's default bf16=True (autocast, fp32 weights)")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    out = {"equivalence": cmd_equivalence, "memory": cmd_memory, "train": cmd_train}[args.cmd](args)
    sys.stdout.flush()
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
