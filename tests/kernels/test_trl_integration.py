"""spear_kernels inside TRL's GRPOTrainer (``spear_kernels.integrations.trl``), tested against real TRL 1.16.

TRL stays out of the project's environment: these tests run ``tests/kernels/trl_child.py`` with the python
of the venv that ``bash bench/trl_env.sh`` makes (``bench/.venv-trl``; another one with ``$SPEAR_TRL_VENV``
or ``$SPEAR_TRL_PYTHON``), after installing this checkout's ``kernels/`` alone into a temporary folder with
that venv's pip (offline, no dependencies) — so what runs is the package as ``pip install ./kernels`` ships
it. Without that venv the tests skip and say how to make it (CI makes it: scripts/test.sh).

A: TRL's own fused head and spear's give the same per-token log-probs and entropies (policy, reference,
   chunked by ``batch_size`` or not), the same GRPO loss and the same gradient of every parameter, fp32 and
   bf16 (autocast), on fresh random inputs with left-padded prompts and completions padded after EOS; both
   heads are also compared with the exact head (float64); a tiny Mixtral gives TRL's MoE auxiliary loss.
B: peak memory of the log-prob computation (forward + backward) at V = 49,152, each head in a fresh
   process (peak RSS, reset just before the measured call): spear's must be below half of TRL's.
C: a few GRPOTrainer training steps with spear's head (TRL's own head stubbed to fail): finite losses,
   every parameter moved.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("trl_child.py")
PIP_OFFLINE = ["--no-index", "--no-build-isolation", "--no-deps", "--disable-pip-version-check", "--no-input",
               "--no-cache-dir", "-q"]  # fmt: skip
# A (fp32, bf16): log-prob / entropy absolute, loss relative, gradient relative (max |a - b| / max |b| per
# parameter). bf16: TRL's head takes the target logit from its bf16 logits tile, spear's recomputes it in
# fp32, so log-probs differ by up to half a bf16 ulp of the largest logit / T (see _bf16_logit_tol, ~0.02
# here); entropies agree far closer.
# Old log-probs are kept off the clip edges (trl_child.CLIP_EDGE_MARGIN): otherwise one token clipped by one
# head and not the other switches its whole gradient (seen: 12 % apart at seed 473600165).
TOL = {"float32": (1e-4, 1e-5, 1e-4), "bfloat16": (1e-2, 3e-2, 6e-2)}


def _bf16_logit_tol(max_abs_z: float, temperature: float) -> float:
    """Twice half a bf16 ulp (8 significant bits) of the largest logit before the temperature, over T."""
    top = max_abs_z * temperature
    return 2 * 2.0 ** (math.floor(math.log2(max(top, 1e-6))) - 8) / temperature + 2e-3


def _trl_python() -> Path | None:
    if os.environ.get("SPEAR_TRL_PYTHON"):
        return Path(os.environ["SPEAR_TRL_PYTHON"])
    venv = Path(os.environ.get("SPEAR_TRL_VENV") or REPO / "bench" / ".venv-trl")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def trl_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = _trl_python()
    if python is None or not python.exists():
        reason = f"no TRL venv ({python} is missing): run `bash bench/trl_env.sh` (or set SPEAR_TRL_VENV)"
        print(f"\nSKIP test_trl_integration: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("trl")
    src = root / "kernels"
    shutil.copytree(REPO / "kernels", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    site = root / "site"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    r = subprocess.run([str(python), "-m", "pip", "install", *PIP_OFFLINE, "--target", str(site), str(src)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel_trl = site / "spear_kernels" / "integrations" / "trl.py"
    assert wheel_trl.is_file(), "the installed package lacks spear_kernels.integrations"
    child_env = {**env, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
                 "PYTHONWARNINGS": "ignore"}  # fmt: skip
    return {"python": str(python), "site": site, "root": root, "env": child_env}


def _child(trl_env: dict[str, Any], *args: str, timeout: int = 900, **env: str) -> dict[str, Any]:
    workdir = Path(trl_env["root"]) / f"w{random.randrange(10**9)}"
    workdir.mkdir()
    cmd = [trl_env["python"], str(CHILD), *args, "--workdir", str(workdir)]
    r = subprocess.run(cmd, cwd=workdir, env={**trl_env["env"], **env}, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_same_logprobs_loss_and_gradients_as_trl(trl_env: dict[str, Any]) -> None:
    seed = random.randrange(2**31)
    out = _child(trl_env, "equivalence", "--dtype", "float32,bfloat16", "--seed", str(seed))
    print(f"\ntrl {out['trl']}, transformers {out['transformers']}, torch {out['torch']}, seed {seed}")
    assert out["trl"].startswith("1.16"), out["trl"]
    assert Path(out["spear_kernels_file"]).is_relative_to(trl_env["site"])  # the package as pip installs it
    for dtype, (tol_lp, tol_loss, tol_grad) in TOL.items():
        r = out[dtype]
        print(f"{dtype}: |logp diff| {r['lp_abs']:.2e}, |entropy diff| {r['ent_abs']:.2e}, loss "
              f"{r['loss']['trl']:.6f} vs {r['loss']['spear']:.6f}, gradients rel {r['grad_rel_max']:.2e}; vs exact logp: TRL "
              f"{r['lp_vs_exact']['trl']:.2e}, spear {r['lp_vs_exact']['spear']:.2e}")  # fmt: skip
        assert r["uses_spear_head"] == {"trl": False, "spear": True, "patched": True}
        assert r["ref_uses_spear_head"] == {"trl": False, "spear": True, "patched": True}
        # spear's head ran for every call of the spear trainers and never for TRL's
        assert r["kernel_calls"]["trl"] == 0 and r["kernel_calls"]["spear"] >= 4, r["kernel_calls"]
        assert r["loss_kernel_calls"] == {"trl": 0, "spear": 1, "patched": 1}
        # exactly TRL's outputs: shapes [B, logits_to_keep], fp32, 0 on padding, entropy None unless asked for
        for key in ("shape", "ent_shape"):
            assert r[key]["spear"] == r[key]["trl"] == [6, 19]
        assert r["dtype_lp"]["spear"] == r["dtype_lp"]["trl"] == "torch.float32"
        assert r["dtype_ent"]["spear"] == r["dtype_ent"]["trl"] == "torch.float32"
        assert r["loss_dtype"]["spear"] == r["loss_dtype"]["trl"]
        assert all(r["zero_on_padding"].values()) and all(r["ent_none_without_compute_entropy"].values())
        assert all(r["aux_none"].values())
        # same numbers
        tol_logit = _bf16_logit_tol(r["max_abs_logit"], r["temperature"]) if dtype == "bfloat16" else tol_lp
        for key in ("lp_abs", "lp_nobatch_abs", "ref_lp_abs"):
            assert r[key] <= tol_logit, (dtype, key, r[key], tol_logit)
        assert r["ent_abs"] <= tol_lp, (dtype, r["ent_abs"])
        # relative to the loss, or to the size of its terms (|advantage|) where they cancel to near zero
        assert r["loss_abs"] <= tol_loss * max(abs(r["loss"]["trl"]), r["adv_scale"]), (dtype, r["loss"])
        assert r["grad_count"]["spear"] == r["grad_count"]["trl"] == 21
        assert r["grad_rel_max"] <= tol_grad, (dtype, sorted(r["grad_rel"].items(), key=lambda kv: -kv[1])[:3])
        # against the same weights in float32, spear's bf16 gradients are no further off than TRL's
        if dtype == "bfloat16":
            assert r["grad_vs_fp32"]["spear"] <= 1.5 * r["grad_vs_fp32"]["trl"] + 0.02, r["grad_vs_fp32"]
        # both heads are as close to the exact (float64) head as their precision allows; spear's no further
        slack = 1e-5 if dtype == "float32" else 1e-3
        assert r["lp_vs_exact"]["spear"] <= 1.5 * r["lp_vs_exact"]["trl"] + slack, r["lp_vs_exact"]
        assert r["ent_vs_exact"]["spear"] <= 1.5 * r["ent_vs_exact"]["trl"] + slack, r["ent_vs_exact"]
        # patch_grpo_trainer on a plain GRPOTrainer is the same as SpearGRPOTrainer
        assert r["patched_equal"] and r["patched_grad_rel"] == 0.0
        assert r["all_masked_ok"]
    moe = out["moe"]  # Mixtral with router logits: TRL's load-balancing loss, same log-probs
    assert moe["aux_enabled"] == [True, True] and moe["aux"][0] == pytest.approx(moe["aux"][1], rel=1e-6)
    assert moe["lp_abs"] <= 1e-4 and moe["ent_abs"] <= 1e-4, moe
    peft = out["peft"]  # LoRA (peft_config): TRL patches get_base_model(), so does spear
    if "skipped" in peft:
        print(f"PEFT check skipped: {peft['skipped']}")
    else:
        assert peft["model_type"] == "PeftModelForCausalLM" and peft["uses_spear_head"] == [True, False], peft
        assert peft["kernel_calls"][0] >= 1 and peft["kernel_calls"][1] == 0, peft
        assert peft["lp_abs"] <= 1e-4 and peft["ent_abs"] <= 1e-4 and peft["grad_count"] > 0, peft
        assert peft["grad_rel_max"] <= 1e-4, peft
    ref = out["refusals"]
    assert "multimodal" in ref.get("pixel_values", ""), ref
    assert "is_top1" in ref.get("is_top1", "") and "soft-caps" in ref.get("softcap", ""), ref
    assert ref["plain_forward_has_logits"] == "True"  # generation still uses the model's own forward


def test_peak_memory_below_trl(trl_env: dict[str, Any]) -> None:
    """V = 49,152, fp32, 2 rows × (24 prompt + 1,024 completion) tokens by default (TRL's peak grows with the
    tokens up to 4,096 per tile; 8,192 tokens need ~5 GB for TRL's side: SPEAR_TRL_MEM_ROWS=8)."""
    rows = os.environ.get("SPEAR_TRL_MEM_ROWS", "2")
    precision = os.environ.get("SPEAR_TRL_MEM_PRECISION", "fp32")
    common = ["memory", "--vocab", "49152", "--rows", rows, "--completion", "1024", "--precision", precision]
    res = {v: _child(trl_env, *common, "--variant", v, SPEAR_KERNELS_POISON="0") for v in ("trl", "spear")}
    t, s = res["trl"], res["spear"]
    ratio = t["peak"] / s["peak"]
    gib = 2**30
    print(f"\nlog-prob computation (forward + backward), V = 49,152, {s['scored_tokens']} completion tokens, "
          f"{precision}: peak extra RSS TRL {t['peak'] / gib:.3f} GiB (forward {t['forward_peak'] / gib:.3f}), "
          f"spear {s['peak'] / gib:.3f} GiB (forward {s['forward_peak'] / gib:.3f}): {ratio:.1f}x lower; "
          f"time TRL {t['forward_s']:.1f} + {t['backward_s']:.1f} s, "
          f"spear {s['forward_s']:.1f} + {s['backward_s']:.1f} s")  # fmt: skip
    assert t["entropy_mean"] == pytest.approx(s["entropy_mean"], abs=1e-3)  # the same computation
    assert 2 * s["peak"] < t["peak"], res


def test_grpo_training_steps(trl_env: dict[str, Any]) -> None:
    out = _child(trl_env, "train", "--steps", "2")
    print(f"\n{out['global_step']} GRPOTrainer steps with spear's head in {out['seconds']:.1f} s: losses "
          f"{out['losses']}, kl {out['kl']}, entropy {out['entropy']}")  # fmt: skip
    assert out["global_step"] == 2 and len(out["losses"]) == 2
    assert all(x == x and abs(x) < 1e6 for x in out["losses"]), out["losses"]
    assert out["uses_spear_head"] and out["ref_uses_spear_head"]
    assert out["trl_head_calls"] == 0 and out["kernel_calls"] >= 4, out  # old, ref and policy log-probs
    assert out["changed"] == out["params"] and out["max_change"] > 0, out
