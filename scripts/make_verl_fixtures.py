"""Write verl 0.9.1 reference outputs for the parity tests: tests/algorithms/fixtures/verl091.pt.

The fixture holds seeded random inputs and what verl 0.9.1 returns for them: policy-loss values,
gradients w.r.t. ``log_prob``, metrics dicts and output dtypes (vanilla with dual-clip and the
+-20 clamp active, clip_cov with a seeded ``torch.randperm`` draw, kl_cov, gpg; bool and float
masks; fully masked rows; every ``loss_agg_mode`` and ``global_batch_info`` variants), ``agg_loss``,
``kl_penalty`` kinds, entropy / log-prob functions, masked reductions and GRPO advantages (std and
no std, groups of one, string uids). ``tests/algorithms/test_verl_parity.py`` compares ours with it.
This script imports only verl (never spear_engine), so the references are independent of our code.

Setup (verl's package ``__init__`` pulls in ray, vLLM hooks etc.; only ``core_algos`` and
``torch_functional`` are needed, so the package is unpacked and imported without its ``__init__``)::

    pip download verl==0.9.1 --no-deps -d /tmp/verl_whl
    unzip -q /tmp/verl_whl/verl-0.9.1-*.whl -d /tmp/verl_src
    pip install --target /tmp/verl_deps omegaconf tensordict transformers ray codetiming
    # torch and numpy come from the project venv; do not install them into /tmp/verl_deps
    python scripts/make_verl_fixtures.py            # VERL_SRC / VERL_DEPS override the two paths

The same loader is used by the live parity test, which runs when verl is importable this way.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

VERL_SRC = os.environ.get("VERL_SRC", "/tmp/verl_src")
VERL_DEPS = os.environ.get("VERL_DEPS", "/tmp/verl_deps")
OUT = Path(__file__).resolve().parent.parent / "tests" / "algorithms" / "fixtures" / "verl091.pt"

AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
]
KL_KINDS = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]


def load_verl():
    """Import verl.trainer.ppo.core_algos and verl.utils.torch_functional without verl/__init__.py."""
    if VERL_DEPS not in sys.path:
        sys.path.append(VERL_DEPS)  # appended: the venv's own packages win
    if "verl" not in sys.modules:
        package = types.ModuleType("verl")
        package.__path__ = [str(Path(VERL_SRC) / "verl")]
        sys.modules["verl"] = package
    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as torch_functional

    return core_algos, torch_functional


def verl_version() -> str:
    for entry in Path(VERL_SRC).glob("verl-*.dist-info"):
        return entry.name[len("verl-") : -len(".dist-info")]
    return "unknown"


def loss_inputs(gen: torch.Generator, batch: int, width: int, mask_kind: str, dtype=torch.float32):
    """old/new log-probs, advantages, mask: dual clip active, a few |delta| > 20, masked rows."""
    old = -torch.rand(batch, width, generator=gen, dtype=dtype) * 3
    delta = torch.randn(batch, width, generator=gen, dtype=dtype) * 1.2
    delta[0, 0], delta[1, 1] = 25.0, -25.0
    new = old + delta
    adv = torch.randn(batch, width, generator=gen, dtype=dtype) * 2
    adv[0, 0] = -3.0  # huge ratio with A < 0: dual clip
    mask = torch.rand(batch, width, generator=gen) > 0.25
    mask[0, :2] = True
    mask[1, 1] = True
    mask[batch - 1] = False  # a fully masked row
    mask = mask if mask_kind == "bool" else mask.to(dtype)
    return {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": mask}


def make_config(loss_mode: str, policy: dict, batch_info: dict, clip_ratio_c: float = 3.0):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": clip_ratio_c,
            "global_batch_info": batch_info,
            "policy_loss": {"loss_mode": loss_mode, **policy},
        }
    )


POLICY_VARIANTS = {
    "vanilla": [{}],
    "gpg": [{}],
    # wide bounds so that candidates exist; then the verl yaml defaults (few or no candidates)
    "clip_cov": [
        {"clip_cov_ratio": 0.2, "clip_cov_lb": -2.0, "clip_cov_ub": 5.0},
        {"clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0},
        {"clip_cov_ratio": None, "clip_cov_lb": None, "clip_cov_ub": None},
    ],
    "kl_cov": [{"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.1}, {"kl_cov_ratio": None, "ppo_kl_coef": None}],
}

BATCH_INFOS = [
    {},
    {"global_batch_size": 1},  # the older verl's seq-mean-token-sum-norm (official SPEAR)
    {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 9, "loss_scale_factor": 4},
]


def policy_case(
    core_algos, loss_mode, variant, batch_info, agg, inputs, seed, clip_c=3.0, weights=None
) -> dict:
    """Run verl's loss once (global RNG seeded right before the call) and record the case."""
    config = make_config(loss_mode, variant, batch_info, clip_ratio_c=clip_c)
    log_prob = inputs["log_prob"].clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss, metrics = core_algos.get_policy_loss_fn(loss_mode)(
        inputs["old_log_prob"],
        log_prob,
        inputs["advantages"],
        inputs["response_mask"],
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=weights,
    )
    loss.backward()
    return {
        "loss_mode": loss_mode,
        "policy_loss": variant,
        "batch_info": batch_info,
        "loss_agg_mode": agg,
        "clip_ratio_c": clip_c,
        "seed": seed,
        "inputs": inputs,
        "weights": weights,
        "loss": loss.detach(),
        "grad": log_prob.grad.detach(),
        "metrics": dict(metrics),
        "dtype": str(loss.dtype),
    }


def policy_loss_cases(core_algos) -> list[dict]:
    cases = []
    gen = torch.Generator().manual_seed(1234)
    seed = 100
    for loss_mode, variants in POLICY_VARIANTS.items():
        for variant in variants:
            for mask_kind in ("bool", "float"):
                for agg in AGG_MODES:
                    for batch_info in BATCH_INFOS:
                        seed += 1
                        inputs = loss_inputs(gen, 6, 9, mask_kind)
                        cases.append(
                            policy_case(core_algos, loss_mode, variant, batch_info, agg, inputs, seed)
                        )
    # extras: float64 inputs, rollout IS weights, dual-clip constant 10
    extras = [
        ("vanilla", {}, torch.float64, False, 10.0, "seq-mean-token-sum-norm"),
        ("vanilla", {}, torch.float32, True, 3.0, "token-mean"),
        ("clip_cov", POLICY_VARIANTS["clip_cov"][0], torch.float32, True, 3.0, "seq-mean-token-mean"),
        ("kl_cov", POLICY_VARIANTS["kl_cov"][0], torch.float64, True, 3.0, "token-sum"),
        ("gpg", {}, torch.float32, True, 3.0, "seq-mean-token-sum"),
    ]
    for loss_mode, variant, dtype, with_weights, clip_c, agg in extras:
        seed += 1
        inputs = loss_inputs(gen, 5, 7, "float", dtype)
        weights = torch.rand(5, 7, generator=gen, dtype=dtype) + 0.5 if with_weights else None
        cases.append(policy_case(core_algos, loss_mode, variant, {}, agg, inputs, seed, clip_c, weights))
    # a fully masked micro-batch (token-mean and the seq modes divide 0 by 0 in verl 0.9)
    for loss_mode in ("vanilla", "clip_cov"):
        for agg in AGG_MODES:
            seed += 1
            inputs = loss_inputs(gen, 3, 4, "bool")
            inputs["response_mask"][:] = False
            cases.append(
                policy_case(core_algos, loss_mode, POLICY_VARIANTS[loss_mode][0], {}, agg, inputs, seed)
            )
    return cases


def agg_cases(core_algos) -> list[dict]:
    gen = torch.Generator().manual_seed(99)
    cases = []
    for agg in AGG_MODES:
        for mask_kind in ("bool", "float"):
            for batch_info in BATCH_INFOS:
                loss_mat = torch.randn(5, 8, generator=gen)
                mask = torch.rand(5, 8, generator=gen) > 0.4
                mask[2] = False
                mask = mask if mask_kind == "bool" else mask.float()
                out = core_algos.agg_loss(loss_mat, mask, agg, **batch_info)
                cases.append(
                    {"loss_mat": loss_mat, "mask": mask, "mode": agg, "batch_info": batch_info, "out": out}
                )
    return cases


def kl_cases(core_algos) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    cases = []
    for kind in KL_KINDS + [k + "+" for k in KL_KINDS]:
        logprob = torch.randn(4, 6, generator=gen) * 3
        ref = torch.randn(4, 6, generator=gen) * 3
        logprob[0, 0], ref[0, 0] = 0.0, -30.0  # k3 clamps active
        x = logprob.clone().requires_grad_(True)
        value = core_algos.kl_penalty(x, ref, kind)
        upstream = torch.randn(4, 6, generator=gen)
        (value * upstream).sum().backward()
        cases.append(
            {
                "kind": kind,
                "logprob": logprob,
                "ref": ref,
                "upstream": upstream,
                "value": value.detach(),
                "grad": x.grad,
            }
        )
    return cases


def token_cases(core_algos, F) -> dict:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 64, generator=gen) * 4
    labels = torch.randint(0, 64, (3, 5), generator=gen)
    upstream = torch.randn(3, 5, generator=gen)
    out = {"logits": logits, "labels": labels, "upstream": upstream}
    x = logits.clone().requires_grad_(True)
    ent = F.entropy_from_logits(x)
    (ent * upstream).sum().backward()
    out.update(entropy=ent.detach(), entropy_grad=x.grad)
    x = logits.clone().requires_grad_(True)
    lp = F.logprobs_from_logits(x, labels)
    (lp * upstream).sum().backward()
    out.update(logprobs=lp.detach(), logprobs_grad=x.grad)
    bf16 = logits.to(torch.bfloat16)
    out.update(
        entropy_bf16=F.entropy_from_logits(bf16),
        logprobs_bf16=F.logprobs_from_logits(bf16, labels),
    )
    mask = torch.rand(3, 5, generator=gen) > 0.3
    out["mask"] = mask
    out["entropy_loss"] = {m: core_algos.compute_entropy_loss(logits, mask, m) for m in AGG_MODES}
    values = torch.randn(4, 6, generator=gen)
    vmask = torch.rand(4, 6, generator=gen) > 0.5
    out["masked"] = {
        "values": values,
        "mask": vmask,
        "sum": F.masked_sum(values, vmask),
        "sum_axis": F.masked_sum(values, vmask.float(), axis=-1),
        "mean": F.masked_mean(values, vmask),
        "mean_axis": F.masked_mean(values, vmask, axis=0),
        "var": F.masked_var(values, vmask),
        "var_biased": F.masked_var(values, vmask.float(), unbiased=False),
    }
    return out


def grpo_cases(core_algos) -> list[dict]:
    gen = torch.Generator().manual_seed(11)
    uids_str = ["p0", "p1", "p0", "p2", "p1", "p0", "p3", "p2", "p1", "p1"]  # p3 is a group of one
    uids_int = [0, 0, 0, 1, 1, 1, 2, 3, 3, 3]
    cases = []
    for uids in (uids_str, uids_int):
        for norm in (True, False):
            for mask_kind in ("bool", "float"):
                rewards = torch.zeros(len(uids), 6)
                lengths = torch.randint(1, 7, (len(uids),), generator=gen)
                scores = torch.randint(0, 3, (len(uids),), generator=gen).float() + torch.rand(
                    len(uids), generator=gen
                )
                mask = torch.arange(6)[None, :] < lengths[:, None]
                rewards[torch.arange(len(uids)), lengths - 1] = scores
                mask = mask if mask_kind == "bool" else mask.float()
                index = np.array(uids, dtype=object)
                adv, ret = core_algos.compute_grpo_outcome_advantage(
                    rewards, mask, index, norm_adv_by_std_in_grpo=norm
                )
                cases.append(
                    {
                        "uids": list(uids),
                        "norm": norm,
                        "rewards": rewards,
                        "mask": mask,
                        "advantages": adv,
                        "returns": ret,
                    }
                )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    core_algos, F = load_verl()
    fixture = {
        "meta": {"verl_version": verl_version(), "torch_version": str(torch.__version__)},
        "policy_loss": policy_loss_cases(core_algos),
        "agg_loss": agg_cases(core_algos),
        "kl_penalty": kl_cases(core_algos),
        "token": token_cases(core_algos, F),
        "grpo": grpo_cases(core_algos),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB), verl {fixture['meta']['verl_version']}"
    )


if __name__ == "__main__":
    main()
