"""verl's policy-loss registry: ``spear_kernels.integrations.verl`` registers ``spear_vanilla``,
``spear_clip_cov``, ``spear_kl_cov`` and ``spear_gpg`` through verl's ``register_policy_loss``.

Two layers:

* **Real verl 0.9.1** (the ``*_live`` tests). verl installs here with ``--no-deps`` in its own venv,
  ``bench/.venv-verl`` (``bash bench/verl_env.sh``; ``scripts/test.sh`` creates it; another path:
  ``SPEAR_VERL_VENV``). Each test runs ``tests/kernels/verl_child.py`` in that venv's python with this
  working tree's ``kernels/`` on PYTHONPATH as ``spear_kernels``: the losses reach verl's registry by
  plain import, by ``actor_rollout_ref.model.external_lib`` (verl's ``import_external_libs``) and by
  ``VERL_USE_EXTERNAL_MODULES``; resolved through verl's own ``get_policy_loss_fn`` they give verl's
  built-in loss, gradient and metrics on fresh random inputs (fp32 and bf16, odd sizes, masked rows, every
  aggregation, global batch counts); and verl's actor loss (``ppo_loss``) selects them by
  ``ActorConfig.policy_loss.loss_mode``. Skipped, with the reason printed, only when that venv does not
  exist.
* **A stand-in of verl's registry** (always, in this process): a tiny ``verl.trainer.ppo.core_algos`` in a
  temp dir with verl 0.9.1's ``register_policy_loss`` / ``get_policy_loss_fn`` semantics (decorator that
  stores and returns the function; ValueError listing the names), so the registration, the config reading
  and both backends (Triton under ``TRITON_INTERPRET=1``) are checked without verl, against
  ``spear_kernels.reference`` and verl's metric definitions written out here.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BACKENDS

from spear_kernels import BACKEND_ENV
from spear_kernels.reference import clip_cov_candidates_ref, kl_cov_selected_ref, policy_loss_ref

REPO = Path(__file__).resolve().parents[2]
VERL_VENV = Path(os.environ.get("SPEAR_VERL_VENV", REPO / "bench" / ".venv-verl"))
CHILD = Path(__file__).with_name("verl_child.py")
SEED = int.from_bytes(os.urandom(4), "little")
NAMES = {"vanilla": "spear_vanilla", "clip_cov": "spear_clip_cov", "kl_cov": "spear_kl_cov", "gpg": "spear_gpg"}
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
MODULE = "spear_kernels.integrations.verl"


# ------------------------------------------------------------------------------------------- real verl
@pytest.fixture(scope="module")
def verl_python(tmp_path_factory) -> tuple[str, dict]:
    """(python of the verl venv, its environment with this tree's kernels/ as spear_kernels), or skip."""
    python = VERL_VENV / "bin" / "python"
    if not python.exists():
        reason = (f"verl 0.9.1 venv not found at {VERL_VENV} (create it: bash bench/verl_env.sh; scripts/test.sh "
                  "does); the live verl tests are skipped, the stand-in registry tests still run")  # fmt: skip
        print(reason)
        pytest.skip(reason)
    site = tmp_path_factory.mktemp("verl_site")
    (site / "spear_kernels").symlink_to(REPO / "kernels", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VERL_USE_EXTERNAL_MODULES")}
    env.update(PYTHONPATH=str(site), VERL_USE_EXTERNAL_PLUGINS="none")  # no other verl plugins
    return str(python), env


def _child(verl_python, *args: str, env_extra: dict | None = None, timeout: int = 900) -> dict:
    python, env = verl_python
    proc = subprocess.run([python, str(CHILD), *args], env={**env, **(env_extra or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"verl child {args} gave no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    assert not result["failures"], "\n".join(result["failures"][:20])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return result


@pytest.mark.parametrize("via", ["import", "external_lib", "env"])
def test_registered_in_verl_live(verl_python, via):
    """The four names reach verl 0.9.1's registry, by import, by ``model.external_lib`` (what verl's
    HFModelConfig does in each worker) and by ``VERL_USE_EXTERNAL_MODULES`` (imported by verl/__init__)."""
    extra = {"VERL_USE_EXTERNAL_MODULES": MODULE} if via == "env" else None
    result = _child(verl_python, "route", "--via", via, env_extra=extra)
    assert result["verl"] == "0.9.1"
    assert result["registered"] == sorted(NAMES.values())


def test_same_as_verl_builtins_live(verl_python):
    """spear_* through verl's get_policy_loss_fn == verl's vanilla / clip_cov / kl_cov / gpg (loss, gradient,
    metrics), fresh random inputs; the cases are listed in verl_child.py's docstring."""
    print(f"seed={SEED}")
    result = _child(verl_python, "parity", "--seed", str(SEED))
    assert result["cases"] >= 200


def test_selected_by_actor_config_live(verl_python):
    """verl's actor loss ``ppo_loss`` with ``ActorConfig.policy_loss.loss_mode="spear_X"`` gives what it gives
    with ``"X"`` (it also fills ``global_batch_info`` from the batch and adds the entropy bonus)."""
    print(f"seed={SEED}")
    _child(verl_python, "ppo_loss", "--seed", str(SEED))


# ------------------------------------------------------------------------------------------- stand-in
STANDIN = '''
"""Stand-in for verl 0.9.1's verl/trainer/ppo/core_algos.py: its policy-loss registry only."""
POLICY_LOSS_REGISTRY = {}


def register_policy_loss(name):
    def decorator(func):
        POLICY_LOSS_REGISTRY[name] = func
        return func

    return decorator


def get_policy_loss_fn(name):
    loss_name = name
    if loss_name not in POLICY_LOSS_REGISTRY:
        raise ValueError(
            f"Unsupported loss mode: {loss_name}. Supported modes are: {list(POLICY_LOSS_REGISTRY.keys())}"
        )
    return POLICY_LOSS_REGISTRY[loss_name]


@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    raise AssertionError("the stand-in's built-in is a placeholder")
'''


def _isolate_modules(prefixes: tuple[str, ...]) -> dict:
    saved = {k: v for k, v in sys.modules.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}
    for k in saved:
        del sys.modules[k]
    return saved


def _restore_modules(saved: dict, prefixes: tuple[str, ...]) -> None:
    for k in [k for k in sys.modules if any(k == p or k.startswith(p + ".") for p in prefixes)]:
        del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture
def standin(tmp_path):
    """(stand-in core_algos, spear_kernels.integrations.verl imported against it); sys.modules restored after."""
    root = tmp_path / "standin"
    pkg = root / "verl" / "trainer" / "ppo"
    pkg.mkdir(parents=True)
    for d in (root / "verl", root / "verl" / "trainer", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "core_algos.py").write_text(textwrap.dedent(STANDIN))
    prefixes = ("verl", MODULE)
    saved = _isolate_modules(prefixes)
    sys.path.insert(0, str(root))
    try:
        core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
        assert core_algos.__file__.startswith(str(root))
        yield core_algos, importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(root))
        _restore_modules(saved, prefixes)


def test_registers_own_names_standin(standin):
    core_algos, sv = standin
    for mode, name in NAMES.items():
        fn = core_algos.get_policy_loss_fn(name)
        assert fn is sv.REGISTERED[name] and fn.__name__ == f"compute_policy_loss_spear_{mode}"
    assert core_algos.get_policy_loss_fn("vanilla").__module__ == "verl.trainer.ppo.core_algos"  # untouched
    with pytest.raises(ValueError, match="spear_kl_cov"):
        core_algos.get_policy_loss_fn("spear_unknown")
    again = sv.register_spear_losses()  # idempotent: the same names, replaced
    assert set(again) == set(NAMES.values()) and len(core_algos.POLICY_LOSS_REGISTRY) == 1 + len(NAMES)
    mine: dict = {}
    out = sv.register_spear_losses(lambda name: lambda fn: mine.setdefault(name, fn), backend="torch")
    assert out == mine and set(mine) == set(NAMES.values())


def test_import_without_verl_raises():
    saved = _isolate_modules(("verl", MODULE))
    sys.modules["verl"] = None  # import verl -> ImportError, whatever is installed
    try:
        with pytest.raises(ImportError, match="needs verl"):
            importlib.import_module(MODULE)
    finally:
        _restore_modules(saved, ("verl", MODULE))


def test_spear_kernels_never_imports_verl(tmp_path):
    """spear_kernels (and its integrations package) import neither verl nor the verl adapter."""
    (tmp_path / "spear_kernels").symlink_to(REPO / "kernels", target_is_directory=True)
    code = ("import sys, spear_kernels, spear_kernels.integrations; "
            "bad = [m for m in sys.modules if m == 'verl' or m.startswith(('verl.', 'spear_kernels.integrations.'))]; "
            "assert not bad, bad")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


# verl's actor config as verl 0.9 passes it: a dataclass with attribute access and .get (BaseConfig)
@dataclass
class _PolicyLossConfig:
    loss_mode: str = "vanilla"
    clip_cov_ratio: float | None = 0.0002
    clip_cov_lb: float | None = 1.0
    clip_cov_ub: float | None = 5.0
    kl_cov_ratio: float | None = 0.0002
    ppo_kl_coef: float | None = 0.1

    def get(self, key, default=None):
        return getattr(self, key, default)


@dataclass
class _ActorConfig:
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = 0.2
    clip_ratio_high: float | None = 0.28
    clip_ratio_c: float = 3.0
    policy_loss: _PolicyLossConfig = field(default_factory=_PolicyLossConfig)
    global_batch_info: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return getattr(self, key, default)


def _inputs(gen, b, t, dtype):
    old = -torch.rand(b, t, generator=gen) * 4
    new = old + torch.randn(b, t, generator=gen) * 0.5
    adv = torch.randn(b, t, generator=gen) * 2
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[b // 2] = False  # a fully masked row
    mask[0, 0] = True
    if t >= 3:
        new[0, 1:3] = old[0, 1:3] + torch.tensor([25.0, -23.0])  # vanilla's ±20 clamp
        mask[0, 1:3] = True
    return old.to(dtype), new.to(dtype), adv.to(dtype), mask


def _verl_metrics(mode, lp, old, adv, mask, selected, low, high, clip_c):
    """verl 0.9.1's metric definitions (core_algos.compute_policy_loss_*), in float64."""
    m = mask.double()

    def mean(x):
        return (torch.where(mask, x.double(), 0.0) * m).sum().item() / (m.sum().item() + 1e-8)

    lp, old, adv = lp.double(), old.double(), adv.double()
    if mode == "gpg":
        return {}
    if mode == "kl_cov":
        return {"actor/ppo_kl": mean((lp - old).abs())}
    if mode == "clip_cov":
        return {"actor/pg_clipfrac": mean(selected.double()), "actor/ppo_kl": mean(-(lp - old))}
    d = (lp - old).clamp(-20, 20)
    r = d.exp()
    l1, l2 = -adv * r, -adv * r.clamp(1 - low, 1 + high)
    lc = torch.maximum(l1, l2)
    return {"actor/pg_clipfrac": mean((l2 > l1).double()), "actor/ppo_kl": mean(-d),
            "actor/pg_clipfrac_lower": mean(((lc > -adv * clip_c) & (adv < 0)).double())}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(NAMES))
def test_values_standin(standin, monkeypatch, backend, mode):
    """Through the stand-in registry, called as verl's ppo_loss calls it: loss and gradient == the torch
    reference, metrics == verl's definitions (clip_cov with a budget that covers every candidate, so the
    detached set is determined; kl_cov against the reference's top-k)."""
    core_algos, _ = standin
    monkeypatch.setenv(BACKEND_ENV, backend)
    gen = torch.Generator().manual_seed(SEED)
    fn = core_algos.get_policy_loss_fn(NAMES[mode])
    shapes = [(5, 13), (1, 7), (3, 1), (4, 33)]
    for i, agg in enumerate(AGG_MODES):
        b, t = shapes[i % len(shapes)]
        dtype = torch.bfloat16 if i % 2 else torch.float32
        old, new, adv, mask = _inputs(gen, b, t, dtype)
        weights = torch.rand(b, t, generator=gen) + 0.5 if i % 3 == 0 else None
        info = [{}, {"dp_size": 2, "batch_num_tokens": 2 * int(mask.sum()) + 1, "global_batch_size": 2 * b + 1,
                     "loss_scale_factor": None}, {"dp_size": 1, "loss_scale_factor": 5}][i % 3]  # fmt: skip
        pl = _PolicyLossConfig(loss_mode=NAMES[mode], clip_cov_ratio=1.0, clip_cov_lb=-3.0, clip_cov_ub=6.0,
                               kl_cov_ratio=0.25, ppo_kl_coef=0.7)  # fmt: skip
        if i == 4:  # null fields fall back as in verl: clip_ratio_low/high -> clip_ratio, ppo_kl_coef -> 1.0
            config = _ActorConfig(clip_ratio=0.25, clip_ratio_low=None, clip_ratio_high=None, policy_loss=pl,
                                  global_batch_info=info)  # fmt: skip
            pl.ppo_kl_coef = None
        else:
            config = SimpleNamespace(**vars(_ActorConfig(policy_loss=pl, global_batch_info=info))) if i % 2 else \
                _ActorConfig(policy_loss=pl, global_batch_info=info)  # fmt: skip
        low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
        high = config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high
        kl_coef = 1.0 if pl.ppo_kl_coef is None else pl.ppo_kl_coef
        x = new.clone().requires_grad_(True)
        loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=agg,
                           config=config, rollout_is_weights=weights)  # fmt: skip
        loss.backward()
        lp32, old32, adv32 = new.float(), old.float(), adv.float()
        selected = None
        if mode == "clip_cov":
            selected, _ = clip_cov_candidates_ref(lp32, old32, adv32, mask.float(), low, high, -3.0, 6.0, 1.0)
        elif mode == "kl_cov":
            selected = kl_cov_selected_ref(lp32, adv32, mask.float(), 0.25)
        xr = lp32.clone().requires_grad_(True)
        ref, _ = policy_loss_ref(xr, old32, adv32, mask.float(), mode, agg, low, high, 3.0, weights=weights,
                                 selected=selected, ppo_kl_coef=kl_coef,
                                 **{k: v for k, v in info.items() if v is not None})  # fmt: skip
        ref.backward()
        msg = f"seed={SEED} {mode} {agg} {dtype} [{b}, {t}] backend={backend}"
        assert loss.dtype == torch.float32 and loss.dim() == 0, msg
        assert x.grad.dtype == dtype, msg
        torch.testing.assert_close(loss, ref.detach(), rtol=2e-5, atol=1e-6, msg=msg)
        bf16 = dtype == torch.bfloat16
        torch.testing.assert_close(x.grad.float(), xr.grad.to(dtype).float(), rtol=1e-2 if bf16 else 2e-5,
                                   atol=1e-5 * xr.grad.abs().max().item() + 1e-9, msg=msg)  # fmt: skip
        expect = _verl_metrics(mode, lp32, old32, adv32, mask, selected, low, high, 3.0)
        assert set(metrics) == set(expect), msg
        assert all(isinstance(v, float) for v in metrics.values()), msg
        assert metrics == pytest.approx(expect, rel=1e-5, abs=1e-6), msg


def test_config_errors_standin(standin):
    core_algos, _ = standin
    old, new, adv, mask = _inputs(torch.Generator().manual_seed(SEED), 2, 5, torch.float32)

    def call(name, config):
        return core_algos.get_policy_loss_fn(name)(old, new, adv, mask, "token-mean", config)

    with pytest.raises(ValueError, match="config=None"):
        call("spear_gpg", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        call("spear_vanilla", _ActorConfig(clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        call("spear_clip_cov", _ActorConfig(policy_loss=_PolicyLossConfig(clip_cov_ratio=0.0)))
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        call("spear_kl_cov", _ActorConfig(policy_loss=_PolicyLossConfig(kl_cov_ratio=0.0)))
    with pytest.raises(ValueError, match="policy_loss"):
        call("spear_kl_cov", SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None))
    with pytest.raises(TypeError, match="global_batch_info"):
        call("spear_gpg", _ActorConfig(global_batch_info={"dp_size": 1, "tokens": 3}))
    # a config without global_batch_info (older verl) aggregates locally
    loss, metrics = call("spear_gpg", SimpleNamespace(clip_ratio=0.2))
    assert metrics == {} and torch.isfinite(loss)
