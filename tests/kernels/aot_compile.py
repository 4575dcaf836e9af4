"""Compile every Triton kernel of spear_kernels ahead of time for NVIDIA targets, without a GPU.

Run by test_gpu_compile.py in a subprocess with TRITON_INTERPRET=0 (under the interpreter the kernels
are not compiled at all). Catches type / lowering errors that the interpreter never sees; uses the
ptxas bundled with triton. Usage: python aot_compile.py 80 90
"""

import importlib.util
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:
    import spear_kernels  # noqa: F401
except ImportError:
    _root = os.path.join(os.path.dirname(__file__), "..", "..", "kernels")
    _spec = importlib.util.spec_from_file_location(
        "spear_kernels", os.path.join(_root, "__init__.py"), submodule_search_locations=[_root]
    )
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["spear_kernels"] = _mod
    _spec.loader.exec_module(_mod)

LE = sys.modules["spear_kernels.logprob_entropy"]
LL = sys.modules["spear_kernels.linear_logprob_entropy"]
CC = sys.modules["spear_kernels.cov_clip"]
PL = sys.modules["spear_kernels.policy_loss"]
FAILED = []


def comp(fn, sig, consts, name, tgt):
    try:
        k = triton.compile(ASTSource(fn, signature=sig, constexprs=consts), target=tgt,
                           options={"num_warps": 8, "num_stages": 3})
        print("OK  ", tgt.arch, name, "shared", k.metadata.shared, flush=True)
    except Exception as e:
        FAILED.append(f"{tgt.arch} {name}")
        print("FAIL", tgt.arch, name, type(e).__name__, "\n    " + "\n    ".join(str(e).splitlines()[-15:]), flush=True)


def compile_all(arch: int) -> None:
    tgt = GPUTarget("cuda", arch, 32)
    for dt in ["fp32", "bf16"]:
        comp(LE._lpe_fwd_kernel, {"z_ptr": f"*{dt}", "stride_z": "i32", "labels_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "inv_t": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 4096}, f"lpe_fwd {dt}", tgt)
        comp(LE._lpe_bwd_kernel, {"z_ptr": f"*{dt}", "stride_z": "i32", "dz_ptr": f"*{dt}", "stride_dz": "i32", "labels_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32", "gent_ptr": "*fp32", "V": "i32", "z_scale": "fp32", "out_scale": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 4096}, f"lpe_bwd {dt}", tgt)
        bm, bn, bk = (64,128,64) if dt=="fp32" else (128,128,64)
        for store in (False, True):
            comp(LL._linear_fwd_kernel, dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", labels_ptr="*i64", pm_ptr="*fp32", ps_ptr="*fp32", pt_ptr="*fp32", pzy_ptr="*fp32", z_ptr="*fp32", N="i32", V="i32", H="i32", stride_xm="i32", stride_wn="i32", stride_z="i32", n_splits="i32", split_v="i32", inv_t="fp32", HAS_BIAS="constexpr", STORE_Z="constexpr", IEEE="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr"),
                 dict(HAS_BIAS=True, STORE_Z=store, IEEE=dt=="fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), f"linear_fwd {dt} store={store}", tgt)
        comp(LL._linear_dz_kernel, dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", labels_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", glp_ptr="*fp32", gh_ptr="*fp32", dz_ptr=f"*{dt}", N="i32", V="i32", H="i32", v0="i32", vc="i32", stride_xm="i32", stride_wn="i32", stride_dz="i32", inv_t="fp32", HAS_BIAS="constexpr", IEEE="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr"),
             dict(HAS_BIAS=False, IEEE=dt=="fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), f"linear_dz {dt}", tgt)
    for use_rand in (True, False):
        comp(CC._cov_keys_kernel, dict(logp_ptr="*fp32", adv_ptr="*fp32", mask_ptr="*fp32", clip_ptr="*u8", rand_ptr="*fp32", sums_ptr="*fp32", keys_ptr="*fp32", n="i32", lb="fp32", ub="fp32", eps="fp32", USE_RAND="constexpr", BLOCK="constexpr"), dict(USE_RAND=use_rand, BLOCK=1024), f"cov_keys rand={use_rand}", tgt)
    for mode in range(4):
        for hw in (True, False):
            comp(PL._token_loss_kernel, dict(lp_ptr="*fp32", old_ptr="*fp32", adv_ptr="*fp32", sel_ptr="*u8", w_ptr="*fp32", scale_ptr="*fp32", loss_ptr="*fp32", grad_ptr="*fp32", flag_ptr="*i8", kl_ptr="*fp32", n="i32", lo="fp32", hi="fp32", clip_c="fp32", kl_coef="fp32", MODE="constexpr", HAS_W="constexpr", BLOCK="constexpr"), dict(MODE=mode, HAS_W=hw, BLOCK=1024), f"token_loss mode={mode} w={hw}", tgt)


if __name__ == "__main__":
    for a in sys.argv[1:] or ["90"]:
        compile_all(int(a))
    print(f"{len(FAILED)} failed: {FAILED}")
    sys.exit(1 if FAILED else 0)
