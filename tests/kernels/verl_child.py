"""Child process of tests/kernels/test_verl_registry.py, run by the python of the verl 0.9.1 venv
(bench/verl_env.sh) with the working tree's kernels/ on PYTHONPATH as ``spear_kernels``. Prints one JSON
line (the last line of stdout); exits 1 with the failing cases in it when a check fails.

    python verl_child.py route --via import|env|external_lib   # the losses reach verl's registry
    python verl_child.py parity --seed N     # spear_* == verl's built-in, through verl's get_policy_loss_fn
    python verl_child.py ppo_loss --seed N   # selected by ActorConfig.policy_loss.loss_mode in verl's ppo_loss

Parity is against verl's own functions of the same formula on fresh random inputs (odd shapes, bool and
float masks with fully masked rows, |log-ratio| > 20 on some tokens, rollout_is_weights, every
loss_agg_mode, global_batch_info with and without global counts, verl's ActorConfig and a DictConfig,
null fields that fall back). bf16 inputs are compared with verl run on the same values in fp32 (our
loss computes in fp32; verl's would round in bf16), and for vanilla / gpg also with verl in bf16 at
bf16 tolerance. Clip-Cov's random subset: compared exactly when the budget covers every candidate (or
there is none); when it does not, the tokens we detached are read off the gradient and checked to be a
subset of verl's candidates of the right size, and the loss against the torch reference with that set.
Inputs whose covariance ranks / bounds are too close to call in fp32 are redrawn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import traceback

import torch

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
NAMES = {"vanilla": "spear_vanilla", "clip_cov": "spear_clip_cov", "kl_cov": "spear_kl_cov", "gpg": "spear_gpg"}


def _emit(result: dict) -> None:
    print(json.dumps(result, default=str))
    sys.exit(1 if result.get("failures") else 0)


# ------------------------------------------------------------------------------------------------ route
def route(via: str) -> dict:
    import verl
    from verl.trainer.ppo import core_algos

    before = set(core_algos.POLICY_LOSS_REGISTRY)
    if via == "import":
        assert not set(NAMES.values()) & before, f"registered before the import: {sorted(before)}"
        import spear_kernels.integrations.verl as sv
    elif via == "external_lib":  # what HFModelConfig.__post_init__ does with actor_rollout_ref.model.external_lib
        from omegaconf import OmegaConf
        from verl.utils.import_utils import import_external_libs

        assert not set(NAMES.values()) & before, f"registered before external_lib: {sorted(before)}"
        cfg = OmegaConf.from_dotlist(["actor_rollout_ref.model.external_lib=spear_kernels.integrations.verl"])
        import_external_libs(cfg.actor_rollout_ref.model.external_lib)
        sv = sys.modules["spear_kernels.integrations.verl"]
    elif via == "env":  # VERL_USE_EXTERNAL_MODULES, imported by verl/__init__ (set by the parent)
        assert "spear_kernels.integrations.verl" in os.environ.get("VERL_USE_EXTERNAL_MODULES", "")
        assert set(NAMES.values()) <= before, f"not registered by verl's import: {sorted(before)}"
        sv = sys.modules["spear_kernels.integrations.verl"]
    else:
        raise ValueError(via)
    failures = []
    for mode, name in NAMES.items():
        fn = core_algos.get_policy_loss_fn(name)
        if fn is not sv.REGISTERED[name]:
            failures.append(f"{name}: get_policy_loss_fn gives {fn!r}")
        builtin = core_algos.get_policy_loss_fn(mode)
        if builtin.__module__ != "verl.trainer.ppo.core_algos":
            failures.append(f"verl's built-in {mode!r} was replaced by {builtin!r}")
    try:
        core_algos.get_policy_loss_fn("spear_nonexistent")
        failures.append("an unknown name did not raise")
    except ValueError as e:
        if "spear_clip_cov" not in str(e):
            failures.append(f"verl's error does not list the spear losses: {e}")
    return {"check": "route", "via": via, "verl": verl.__version__, "failures": failures,
            "registered": sorted(n for n in core_algos.POLICY_LOSS_REGISTRY if n.startswith("spear_"))}  # fmt: skip


# ------------------------------------------------------------------------------------------------ inputs
def _draw(gen: torch.Generator, b: int, t: int, mask_kind: str):
    old = -torch.rand(b, t, generator=gen) * 4
    new = old + torch.randn(b, t, generator=gen) * 0.5
    adv = torch.randn(b, t, generator=gen) * 2
    mask = torch.rand(b, t, generator=gen) > 0.3
    if b > 1:
        mask[int(torch.randint(0, b, (1,), generator=gen))] = False  # a fully masked row
    if not mask.any():
        mask[0, 0] = True
    if t >= 3:  # |log-ratio| > 20: vanilla's clamp (ratio and ppo_kl) is active there
        new[0, :2] = old[0, :2] + torch.tensor([25.0, -23.0])
        mask[0, :2] = True
    return old, new, adv, (mask if mask_kind == "bool" else mask.float())


def _cov64(lp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.double()
    a, x = adv.double(), lp.double()
    return (a - (a * m).sum() / m.sum()) * (x - (x * m).sum() / m.sum())


def _decidable(mode: str, old, new, adv, mask, pl: dict, eps_low: float, eps_high: float) -> bool:
    """False when a covariance rank (KL-Cov) or bound (Clip-Cov) is too close to call in fp32."""
    valid = mask.bool()
    cov = _cov64(new, adv, mask)
    scale = 1.0 + cov[valid].abs().max().item()
    if mode == "kl_cov":
        c = cov[valid].sort(descending=True).values
        k = max(1, int(c.numel() * pl["kl_cov_ratio"]))
        return k >= c.numel() or (c[k - 1] - c[k]).item() > 1e-5 * scale
    if mode == "clip_cov":
        gap = torch.minimum((cov - pl["clip_cov_lb"]).abs(), (cov - pl["clip_cov_ub"]).abs())[valid]
        return gap.numel() == 0 or gap.min().item() > 1e-5 * scale
    return True


_FALLBACKS = {"clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "ppo_kl_coef": 1.0}  # verl 0.9's, for null fields


def _nullable(pl: dict) -> list[str]:
    """Fields a case may set to null: Clip-Cov's bounds only where the budget covers every candidate (else
    the fallback bounds could make the draw random)."""
    keys = ["ppo_kl_coef"] if "ppo_kl_coef" in pl else []
    if pl.get("clip_cov_ratio", 0.0) >= 1.0:
        keys += ["clip_cov_lb", "clip_cov_ub"]
    return keys


def _effective(pl: dict, nulls: bool) -> dict:
    return {**pl, **{k: _FALLBACKS[k] for k in _nullable(pl)}} if nulls else pl


def _config(kind: str, mode: str, pl: dict, info: dict, nulls: bool):
    clip = {"clip_ratio": 0.2, "clip_ratio_low": None if nulls else 0.2, "clip_ratio_high": None if nulls else 0.28,
            "clip_ratio_c": 3.0}  # fmt: skip
    section = {"loss_mode": NAMES[mode], **pl}
    if nulls:  # verl's fallbacks: null -> its default (see _effective)
        section.update({k: None for k in _nullable(pl)})
    if kind == "dictconfig":
        from omegaconf import OmegaConf

        return OmegaConf.create({**clip, "policy_loss": section, "global_batch_info": dict(info)})
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **clip,
                       policy_loss=PolicyLossConfig(**section), global_batch_info=dict(info))  # fmt: skip


def _run(fn, old, new, adv, mask, agg, config, weights):
    x = new.clone().requires_grad_(True)
    loss, metrics = fn(old, x, adv, mask, loss_agg_mode=agg, config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol_rel: float) -> str | None:
    a, b = a.double(), b.double()
    atol = atol_rel * max(1.0, b.abs().max().item() if b.numel() else 1.0)
    if torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=False):
        return None
    err = (a - b).abs().max().item()
    return f"max |diff| {err:.3g} (atol {atol:.3g}, rtol {rtol})"


def _metrics_close(ours: dict, ref: dict, rel: float = 1e-5, abs_: float = 1e-6) -> str | None:
    if set(ours) != set(ref):
        return f"metric names {sorted(ours)} != verl's {sorted(ref)}"
    for k in ref:
        if not isinstance(ours[k], float):
            return f"{k} is {type(ours[k]).__name__}, verl's is {type(ref[k]).__name__}"
        if abs(ours[k] - ref[k]) > abs_ + rel * abs(ref[k]):
            return f"{k}: {ours[k]!r} != verl's {ref[k]!r}"
    return None


# ------------------------------------------------------------------------------------------------ parity
def parity(seed: int) -> dict:
    from verl.trainer.ppo import core_algos

    import spear_kernels.integrations.verl  # noqa: F401  (registers the spear_* losses)
    from spear_kernels.reference import clip_cov_candidates_ref, policy_loss_ref

    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    failures: list[str] = []
    n_cases = 0
    clip_cov_settings = {  # (policy_loss fields, deterministic?)
        "budget>=candidates": ({"clip_cov_ratio": 1.0, "clip_cov_lb": -3.0, "clip_cov_ub": 6.0}, True),
        "window": ({"clip_cov_ratio": 1.0, "clip_cov_lb": 0.05, "clip_cov_ub": 1.5}, True),
        "no-candidate": ({"clip_cov_ratio": 0.5, "clip_cov_lb": 1e4, "clip_cov_ub": 2e4}, True),
        "random-subset": ({"clip_cov_ratio": 0.1, "clip_cov_lb": -50.0, "clip_cov_ub": 50.0}, False),
    }
    kl_cov_settings = {"ratio=0.1": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.3},
                       "ratio=0.5": {"kl_cov_ratio": 0.5, "ppo_kl_coef": 2.0},
                       "k=1": {"kl_cov_ratio": 1e-4, "ppo_kl_coef": 1.0}}  # fmt: skip
    variants = [("vanilla", "-", {}), ("gpg", "-", {})]
    variants += [("clip_cov", k, v[0]) for k, v in clip_cov_settings.items()]
    variants += [("kl_cov", k, v) for k, v in kl_cov_settings.items()]
    for mode, setting, pl in variants:
        deterministic = mode != "clip_cov" or clip_cov_settings[setting][1]
        for agg in AGG_MODES:
            for info_kind in ("local", "global", "scale-factor"):
                for dtype in (torch.float32, torch.bfloat16):
                    if not deterministic and dtype != torch.float32:
                        continue
                    n_cases += 1
                    case = f"seed={seed} {mode}[{setting}] {agg} {info_kind} {str(dtype)[6:]}"
                    try:
                        err = _parity_case(core_algos, gen, rng, mode, pl, agg, info_kind, dtype, deterministic,
                                           clip_cov_candidates_ref, policy_loss_ref)  # fmt: skip
                    except Exception:
                        err = traceback.format_exc(limit=4)
                    if err:
                        failures.append(f"{case}: {err}")
    failures += _empty_mask(core_algos)
    return {"check": "parity", "seed": seed, "cases": n_cases, "failures": failures}


def _parity_case(core_algos, gen, rng, mode, pl, agg, info_kind, dtype, deterministic, cands_ref, loss_ref):
    nulls = rng.random() < 0.3
    kind = rng.choice(["actorconfig", "dictconfig"])
    mask_kind = rng.choice(["bool", "float"])
    eps_low, eps_high = 0.2, (0.2 if nulls else 0.28)
    for _ in range(100):
        b, t = rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 4, 7, 13, 33, 64])
        old, new, adv, mask = _draw(gen, b, t, mask_kind)
        old, new, adv = old.to(dtype), new.to(dtype), adv.to(dtype)
        if _decidable(mode, old, new, adv, mask, _effective(pl, nulls), eps_low, eps_high):
            break
    else:
        return "no decidable input in 100 draws"
    n_valid, rows = int(mask.bool().sum()), int(mask.bool().any(-1).sum())
    info = {"local": {},
            "global": {"dp_size": 2, "batch_num_tokens": 2 * n_valid + 3, "global_batch_size": 2 * rows + 1,
                       "loss_scale_factor": None},
            "scale-factor": {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
                             "loss_scale_factor": 7}}[info_kind]  # fmt: skip
    weights = torch.rand(b, t, generator=gen) + 0.5 if rng.random() < 0.5 else None
    config = _config(kind, mode, pl, info, nulls)
    ours = _run(core_algos.get_policy_loss_fn(NAMES[mode]), old, new, adv, mask, agg, config, weights)
    ref = _run(core_algos.get_policy_loss_fn(mode), old.float(), new.float(), adv.float(), mask, agg, config,
               weights)  # fmt: skip
    loss, grad, metrics = ours
    tag = f"({kind}, {mask_kind} mask, [{b}, {t}], weights={weights is not None}, nulls={nulls})"
    if grad.dtype != dtype:
        return f"gradient dtype {grad.dtype} != log_prob's {dtype} {tag}"
    if loss.dtype != torch.float32 or loss.dim() != 0:
        return f"loss is {loss.dtype} {tuple(loss.shape)}, expected an fp32 scalar {tag}"
    if not deterministic:
        return _random_clip_cov(ours, ref, old, new, adv, mask, agg, info, weights, _effective(pl, nulls), eps_low, eps_high,
                                cands_ref, loss_ref, tag)  # fmt: skip
    bf16 = dtype == torch.bfloat16
    checks = [("loss", _close(loss, ref[0], 2e-5, 1e-6)),
              ("grad", _close(grad, ref[1], 8e-3 if bf16 else 2e-5, 1e-5 if bf16 else 1e-6)),
              ("metrics", _metrics_close(metrics, ref[2]))]  # fmt: skip
    if bf16 and mode in ("vanilla", "gpg"):  # verl itself in bf16: the same loss up to verl's bf16 rounding
        native = _run(core_algos.get_policy_loss_fn(mode), old, new, adv, mask, agg, config, weights)
        checks.append(("loss vs verl in bf16", _within_bf16(loss, native[0], old, new, adv, mask, mode, agg, info,
                                                            weights, eps_low, eps_high, loss_ref)))  # fmt: skip
    bad = [f"{what}: {err}" for what, err in checks if err]
    return f"{'; '.join(bad)} {tag}" if bad else None


def _within_bf16(loss, native, old, new, adv, mask, mode, agg, info, weights, eps_low, eps_high, loss_ref):
    """|ours - verl's bf16 loss| within verl's bf16 rounding: a few bf16 units (2^-8) of each token's
    |contribution| (each per-token loss rounds after exp / mul / clamp; the sum accumulates in fp32)."""
    from spear_kernels import agg_scale

    info = {k: v for k, v in info.items() if v is not None}
    _, per_token = loss_ref(new.float(), old.float(), adv.float(), mask.float(), mode, "token-sum", eps_low, eps_high,
                            weights=weights)  # fmt: skip
    bound = 2.0**-6 * (per_token.abs() * agg_scale(mask, agg, **info)).sum().item() + 2.0**-8 * abs(native.item())
    diff = abs(loss.item() - native.float().item())
    return None if diff <= bound + 1e-6 else f"|{loss.item()} - {native.item()}| = {diff:.3g} > {bound:.3g}"


def _random_clip_cov(ours, ref, old, new, adv, mask, agg, info, weights, pl, eps_low, eps_high, cands_ref, loss_ref,
                     tag):  # fmt: skip
    """Clip-Cov with fewer detach slots than candidates: both draw a random subset (different streams)."""
    loss, grad, metrics = ours
    cand, budget = cands_ref(new, old, adv, mask.float(), eps_low, eps_high, pl["clip_cov_lb"], pl["clip_cov_ub"],
                             pl["clip_cov_ratio"])  # fmt: skip
    selected = cand & (grad == 0)  # a detached token gets no gradient; any other candidate has -A·r·s ≠ 0
    want = min(budget, int(cand.sum()))
    bad = []
    if int(selected.sum()) != want:
        bad.append(f"{int(selected.sum())} tokens detached, expected min(budget {budget}, candidates {int(cand.sum())})")
    err = _metrics_close(metrics, ref[2])  # pg_clipfrac = detached / valid and ppo_kl: same for any subset
    if err:
        bad.append(err)
    x = new.clone().requires_grad_(True)
    info = {k: v for k, v in info.items() if v is not None}
    expect, _ = loss_ref(x, old, adv, mask.float(), "clip_cov", agg, eps_low, eps_high, weights=weights,
                         selected=selected, **info)  # fmt: skip
    expect.backward()
    for what, e in (("loss vs reference", _close(loss, expect.detach(), 2e-5, 1e-6)),
                    ("grad vs reference", _close(grad, x.grad, 2e-5, 1e-6))):  # fmt: skip
        if e:
            bad.append(f"{what}: {e}")
    return f"{'; '.join(bad)} {tag}" if bad else None


def _empty_mask(core_algos) -> list[str]:
    """A micro-batch without a valid token: 0 and a zero gradient (verl: NaN in the mean modes)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0,
                            "policy_loss": {"kl_cov_ratio": 0.1, "clip_cov_ratio": 0.1}, "global_batch_info": {}})  # fmt: skip
    out = []
    for name in NAMES.values():
        loss, grad, _ = _run(core_algos.get_policy_loss_fn(name), torch.zeros(2, 3), -torch.rand(2, 3),
                             torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool), "token-mean", cfg, None)  # fmt: skip
        if loss.item() != 0.0 or grad.abs().sum().item() != 0.0:
            out.append(f"empty mask {name}: loss {loss.item()}, |grad| {grad.abs().sum().item()}")
    return out


# ------------------------------------------------------------------------------------------------ ppo_loss
def ppo_loss_check(seed: int) -> dict:
    """verl's actor loss (verl.workers.utils.losses.ppo_loss) picks the policy loss by
    config.policy_loss.loss_mode and fills config.global_batch_info from the batch: run it with
    loss_mode=spear_X and loss_mode=X on the same no-padding model output."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, PolicyLossConfig

    import spear_kernels.integrations.verl  # noqa: F401

    ppo_loss = _import_ppo_loss()

    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    failures, n_cases = [], 0
    settings = [("vanilla", {}), ("gpg", {}), ("kl_cov", {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.5}),
                ("clip_cov", {"clip_cov_ratio": 1.0, "clip_cov_lb": -3.0, "clip_cov_ub": 6.0})]  # fmt: skip
    for mode, pl in settings:
        for agg in AGG_MODES:
            for dp_size in (1, 2):
                n_cases += 1
                for _ in range(100):
                    batch = _ppo_batch(gen, rng)
                    if _decidable(mode, batch["old"], batch["lp"], batch["adv"], batch["mask"], pl, 0.2, 0.28):
                        break
                runs = []
                for name in (mode, NAMES[mode]):
                    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                                      clip_ratio_high=0.28, loss_agg_mode=agg, entropy_coeff=0.01,
                                      policy_loss=PolicyLossConfig(loss_mode=name, **pl))  # fmt: skip
                    flat = batch["flat"].clone().requires_grad_(True)
                    n_valid, rows = int(batch["mask"].sum()), int(batch["mask"].any(-1).sum())
                    data = tu.get_tensordict(
                        {"prompts": batch["prompts"], "responses": batch["responses"],
                         "attention_mask": batch["attention_mask"], "response_mask": batch["mask"],
                         "old_log_probs": batch["old"], "advantages": batch["adv"]},
                        non_tensor_dict={"dp_size": dp_size,
                                         "batch_num_tokens": None if dp_size == 1 else 2 * n_valid,
                                         "global_batch_size": None if dp_size == 1 else 2 * rows},
                    )  # fmt: skip
                    loss, metrics = ppo_loss(cfg, {"log_probs": flat, "entropy": batch["entropy"]}, data)
                    loss.backward()
                    runs.append((loss.detach(), flat.grad, {k: float(v.aggregate()) for k, v in metrics.items()}))
                (ref_loss, ref_grad, ref_m), (loss, grad, m) = runs
                errs = [e for e in (_close(loss, ref_loss, 2e-5, 1e-6), _close(grad, ref_grad, 2e-5, 1e-6),
                                    _metrics_close(m, ref_m)) if e]  # fmt: skip
                if errs:
                    failures.append(f"seed={seed} ppo_loss {mode} {agg} dp_size={dp_size}: {'; '.join(errs)}")
    return {"check": "ppo_loss", "seed": seed, "cases": n_cases, "failures": failures}


def _import_ppo_loss():
    """verl.workers.utils.losses.ppo_loss. That module imports an enum from verl.utils.dataset.dataset_utils,
    whose package ``__init__`` imports verl's RL dataset classes (``datasets``, ``PIL``), which the venv leaves
    out (bench/verl_env.sh): without them the package is entered without its ``__init__``; the loss code is
    verl's own either way."""
    import importlib.util
    import types

    if "verl.utils.dataset" not in sys.modules and not all(
        importlib.util.find_spec(m) for m in ("datasets", "PIL")
    ):
        import verl.utils

        package = types.ModuleType("verl.utils.dataset")
        package.__path__ = [os.path.join(os.path.dirname(verl.utils.__file__), "dataset")]
        sys.modules["verl.utils.dataset"] = package
    from verl.workers.utils.losses import ppo_loss

    return ppo_loss


def _ppo_batch(gen: torch.Generator, rng: random.Random) -> dict:
    """A right-padded response batch and the model output in verl's no-padding layout (log-prob of token
    k of a sequence at position k - 1, sequences concatenated)."""
    b, p, r = rng.choice([2, 3, 5]), rng.choice([1, 3]), rng.choice([4, 9, 17])
    lens = torch.randint(1, r + 1, (b,), generator=gen)
    lens[0] = r
    attn = torch.zeros(b, p + r, dtype=torch.long)
    attn[:, :p] = 1
    valid = torch.arange(r).unsqueeze(0) < lens.unsqueeze(1)
    attn[:, p:] = valid.long()
    lp = torch.where(valid, -torch.rand(b, r, generator=gen) * 4, torch.zeros(b, r))
    old = torch.where(valid, lp + torch.randn(b, r, generator=gen) * 0.5, torch.zeros(b, r))
    adv = torch.randn(b, r, generator=gen) * 2
    mask = valid & (torch.rand(b, r, generator=gen) > 0.2)
    mask[0, 0] = True
    if b > 2:
        mask[1] = False  # a fully masked row
    ent = torch.rand(b, r, generator=gen) * 3
    total = int(attn.sum())
    flat, flat_ent, end = torch.zeros(total), torch.zeros(total), 0
    for i in range(b):
        n = int(lens[i])
        end += p + n
        flat[end - n - 1 : end - 1] = lp[i, :n]
        flat_ent[end - n - 1 : end - 1] = ent[i, :n]
    return {"prompts": torch.ones(b, p, dtype=torch.long), "responses": torch.ones(b, r, dtype=torch.long),
            "attention_mask": attn, "mask": mask, "lp": lp, "old": old, "adv": adv, "flat": flat,
            "entropy": flat_ent}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("check", choices=["route", "parity", "ppo_loss"])
    parser.add_argument("--via", default="import", choices=["import", "env", "external_lib"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.check == "route":
        _emit(route(args.via))
    elif args.check == "parity":
        _emit(parity(args.seed))
    else:
        _emit(ppo_loss_check(args.seed))


if __name__ == "__main__":
    main()
