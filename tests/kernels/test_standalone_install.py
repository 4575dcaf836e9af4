"""spear_kernels installs and runs on its own: ``pip install ./kernels`` (kernels/pyproject.toml), without
spear_engine and its requirements.

A copy of kernels/ is installed with pip into an empty folder (offline: ``--no-index``, no build
isolation, no dependencies), then imported in a fresh interpreter whose ``sys.path`` holds that folder and
the interpreter's site-packages (torch, triton) but not the repository, run from a temporary directory.
There the fused loss must match the plain-torch oracle, with triton importable and with triton hidden
(CPU installs without it). A dry run checks that pip, asked to install the package with its declared
dependencies into this environment, would download nothing (the installed torch satisfies them).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
REPO = KERNELS.parent
PIP_OFFLINE = ["--no-index", "--no-build-isolation", "--disable-pip-version-check", "--no-input", "--no-cache-dir"]

pytest.importorskip("setuptools")  # the build backend, used in place (no build isolation: no network)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that could point the child at the repository or at a package index."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env.update(extra)
    return env


def _source_copy(root: Path) -> Path:
    """kernels/ as a user would get it, without build leftovers of earlier installs."""
    src = root / "kernels"
    shutil.copytree(KERNELS, src, ignore=shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info"))
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standalone")
    target = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", *PIP_OFFLINE, "--no-deps", "--target", str(target),
           str(_source_copy(root))]  # fmt: skip
    r = subprocess.run(cmd, cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return target


CHILD = r"""
import json, sys
from pathlib import Path
target, repo, hide_triton = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3] == "1"
if hide_triton:
    sys.modules["triton"] = None  # `import triton` raises ImportError, as on an install without it
import torch
import spear_kernels
from spear_kernels.reference import fused_linear_policy_loss_ref

assert Path(spear_kernels.__file__).resolve().is_relative_to(target), spear_kernels.__file__
assert not any(Path(p or ".").resolve() in (repo, repo / "kernels") for p in sys.path), sys.path
assert not [m for m in sys.modules if m.startswith("spear_engine")]
g = torch.Generator().manual_seed(0)
b, l, h, v = 2, 7, 16, 131
x, w = torch.randn(b, l, h, generator=g), torch.randn(v, h, generator=g) * 0.3
y = torch.randint(0, v, (b, l), generator=g)
old = -torch.rand(b, l, generator=g) * 4 - 3
adv, mask = torch.randn(b, generator=g), torch.ones(b, l)
xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
out = spear_kernels.FusedLinearPolicyLoss(clip_ratio_high=0.28, entropy_coeff=0.01)(xs, ws, y, adv, old, mask)
out.loss.backward()
xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
ref, lp, _ = fused_linear_policy_loss_ref(xr, wr, y, old, adv[:, None].expand(b, l), mask, clip_ratio_high=0.28,
                                          entropy_coeff=0.01)
ref.backward()
print(json.dumps({
    "file": spear_kernels.__file__, "has_triton": spear_kernels.utils.HAS_TRITON,
    "loss": abs(out.loss.item() - ref.item()), "logp": (out.logp - lp).abs().max().item(),
    "dx": ((xs.grad - xr.grad).abs().max() / xr.grad.abs().max()).item(),
    "dw": ((ws.grad - wr.grad).abs().max() / wr.grad.abs().max()).item(),
}))
"""


@pytest.mark.parametrize("hide_triton", [False, True], ids=["triton-importable", "triton-absent"])
def test_installed_package_runs_alone(installed, tmp_path, hide_triton):
    if not hide_triton:
        pytest.importorskip("triton")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = _clean_env(PYTHONPATH=str(installed), SPEAR_KERNELS_BACKEND="auto")
    r = subprocess.run([sys.executable, str(script), str(installed), str(REPO), "1" if hide_triton else "0"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["has_triton"] is (not hide_triton)
    assert res["loss"] < 1e-5 and res["logp"] < 1e-4 and res["dx"] < 2e-4 and res["dw"] < 2e-4, res


def test_installed_package_is_complete_and_needs_only_torch(installed):
    """Every module of kernels/ is in the installed package, and the only hard requirement is torch."""
    pkg = installed / "spear_kernels"
    assert {p.name for p in KERNELS.glob("*.py")} == {p.name for p in pkg.glob("*.py")}
    (meta,) = installed.glob("spear_kernels-*.dist-info/METADATA")
    requires = [ln.split(":", 1)[1].strip() for ln in meta.read_text().splitlines() if ln.startswith("Requires-Dist:")]
    hard = [r for r in requires if "extra ==" not in r]
    assert hard == ["torch>=2.4"], requires


def test_pip_would_download_nothing_into_this_environment(tmp_path):
    """``pip install ./kernels`` with its dependencies, dry run and offline: succeeds only if the installed torch
    already satisfies them, and installs the package alone (no torch, no CUDA wheels)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", *PIP_OFFLINE, str(_source_copy(tmp_path))]
    r = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=180)
    if r.returncode != 0 and "no such option: --dry-run" in r.stderr:
        pytest.skip("pip older than 22.2 has no --dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (would,) = [ln for ln in r.stdout.splitlines() if ln.startswith("Would install")]
    packages = would.removeprefix("Would install").split()
    assert len(packages) == 1 and packages[0].startswith("spear-kernels-"), would
