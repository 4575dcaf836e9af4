import importlib
import itertools

import pytest
import torch
from conftest import BACKENDS, rel_err

from spear_kernels import (
    linear_logprob_entropy,
    linear_logprob_entropy_stats,
    linear_logprob_entropy_with_grad,
)
from spear_kernels.linear_logprob_entropy import CHUNK_SLACK, balanced_chunk_rows, cpu_chunk_rows
from spear_kernels.reference import linear_logprob_entropy_ref

linear_cpu = importlib.import_module("spear_kernels.linear_cpu")

# (logp/entropy abs tol, grad rel tol). bf16 on the torch CPU path: the CPU bf16 GEMM rounds the
# logits to bf16 (as torch eager does); the target logit is recomputed in fp32. Triton keeps fp32 logits.
TOL = {
    ("torch", torch.float32): (5e-5, 5e-5),
    ("triton", torch.float32): (5e-5, 5e-5),
    ("torch", torch.bfloat16): (6e-2, 3e-2),
    ("torch_compile", torch.float32): (5e-5, 5e-5),
    ("torch_compile", torch.bfloat16): (6e-2, 3e-2),
    ("triton", torch.bfloat16): (5e-5, 2e-2),
}
N, H, V = 45, 40, 700  # N, V not multiples of any block or chunk


def _inputs(dtype, bias, n=N, h=H, v=V):
    x = torch.randn(n, h).to(dtype)
    w = (torch.randn(v, h) * 0.4).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    y = torch.randint(0, v, (n,))
    y[2] = -100
    return x, w, b, y


def _ref(x, w, b, y, t, gl, gh):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    lr, hr = linear_logprob_entropy_ref(xr, wr, y, br, t)
    ((lr * gl).sum() + (hr * gh).sum()).backward()
    return lr, hr, xr.grad, wr.grad, None if br is None else br.grad


def _backend_of(p):
    return p if isinstance(p, str) else p.values[0]


LINEAR_BACKENDS = [*BACKENDS, "torch_compile"]
"""The fused linear op also has the torch path with its CPU epilogue compiled by inductor."""


def _needs_inductor(backend) -> None:
    """Skip, with inductor's reason, where backend is torch_compile and inductor cannot build here."""
    if _backend_of(backend) == "torch_compile" and (why := linear_cpu.compiled_epilogue_unavailable()):
        pytest.skip(why)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bias", "temperature"), [(False, 1.0), (True, 0.7)])
def test_autograd_matches_oracle(backend, dtype, bias, temperature):
    _needs_inductor(backend)
    x, w, b, y = _inputs(dtype, bias)
    gl, gh = torch.randn(N), torch.randn(N)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    bs = b.clone().requires_grad_() if bias else None
    lp, h = linear_logprob_entropy(xs, ws, y, bs, temperature, chunk_size=16, backend=backend)
    ((lp * gl).sum() + (h * gh).sum()).backward()
    lr, hr, gx, gw, gb = _ref(x, w, b, y, temperature, gl, gh)
    vt, gt = TOL[(_backend_of(backend), dtype)]
    assert (lp - lr).abs().max().item() < vt
    assert (h - hr).abs().max().item() < vt
    assert xs.grad.dtype == dtype and ws.grad.dtype == dtype
    assert rel_err(xs.grad, gx) < gt
    assert rel_err(ws.grad, gw) < gt
    if bias:
        assert rel_err(bs.grad, gb) < gt


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_grad_matches_oracle(backend, mode, dtype):
    _needs_inductor(backend)
    x, w, b, y = _inputs(dtype, bias=True)
    gl, gh = torch.randn(N), torch.randn(N)
    calls = []

    def grad_fn(i, j, lp, ent):
        calls.append((i, j))
        assert lp.shape == ent.shape == (j - i,)
        return gl[i:j], gh[i:j]

    lp, h, dx, dw, db = linear_logprob_entropy_with_grad(x, w, y, grad_fn, b, 0.9, chunk_size=13,
                                                         backend=backend, mode=mode)
    lr, hr, gx, gw, gb = _ref(x, w, b, y, 0.9, gl, gh)
    vt, gt = TOL[(_backend_of(backend), dtype)]
    assert (lp - lr).abs().max().item() < vt and (h - hr).abs().max().item() < vt
    assert dw.dtype in (torch.float32, dtype)  # Triton in-forward: fp32, cast by the caller
    assert rel_err(dx, gx) < gt and rel_err(dw, gw) < gt and rel_err(db, gb) < gt
    covered = sorted(calls)
    assert covered[0][0] == 0 and covered[-1][1] == N
    assert all(a[1] == b_[0] for a, b_ in itertools.pairwise(covered))


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_extreme_hidden_no_nan(backend):
    _needs_inductor(backend)
    x, w, _b, y = _inputs(torch.float32, bias=False, n=8, v=300)
    x[0] *= 1e3  # logits of order ±1e4
    x[1] = 0.0  # uniform row
    gl, gh = torch.randn(8), torch.randn(8)
    lp, h, dx, dw, _ = linear_logprob_entropy_with_grad(x, w, y, lambda i, j, *_: (gl[i:j], gh[i:j]),
                                                        chunk_size=5, backend=backend)
    for t in (lp, h, dx, dw):
        assert torch.isfinite(t).all()
    lr, hr = linear_logprob_entropy_ref(x.double(), w.double(), y)
    assert (lp.double() - lr).abs().max().item() < 1e-2  # fp32 logits of 1e4 carry ~1e-3 absolute error
    assert (h.double() - hr).abs().max().item() < 1e-2


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_stats_and_leading_dims(backend):
    _needs_inductor(backend)
    x = torch.randn(2, 7, 24)
    w = torch.randn(333, 24) * 0.3
    y = torch.randint(0, 333, (2, 7))
    lp, h = linear_logprob_entropy_stats(x, w, y, temperature=1.5, backend=backend)
    lr, hr = linear_logprob_entropy_ref(x.reshape(-1, 24), w, y.reshape(-1), None, 1.5)
    assert lp.shape == (2, 7)
    torch.testing.assert_close(lp.reshape(-1), lr, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(h.reshape(-1), hr, atol=5e-5, rtol=1e-5)


def test_chunked_cpu_path_chunk_sizes_agree():
    """The CPU chunked path gives the same numbers whatever the chunk size (1 row .. all rows)."""
    x, w, b, y = _inputs(torch.float32, bias=True)
    gl, gh = torch.randn(N), torch.randn(N)
    outs = [
        linear_logprob_entropy_with_grad(x, w, y, lambda i, j, *_: (gl[i:j], gh[i:j]), b, chunk_size=c,
                                         backend="torch")
        for c in (1, 7, N, 1000)
    ]
    for o in outs[1:]:
        for a, r in zip(o, outs[0]):
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "torch_compile"])
def test_bf16_dw_accumulated_over_many_chunks_is_as_accurate_as_torch_eager(backend):
    """The CPU path accumulates bf16 dW across chunks in bf16 (the GEMM adds into it, rounding the running
    sum once per chunk). Even at one row per chunk (512 roundings) its error against the float64 gradient
    stays within 1.5x of torch eager's, which rounds the logits and the full product once each."""
    _needs_inductor(backend)
    n, h, v = 512, 64, 3000
    x, w, _, y = _inputs(torch.bfloat16, bias=False, n=n, h=h, v=v)
    gl, gh = torch.randn(n), torch.randn(n)

    def eager_dw(dtype):
        xs, ws = x.to(dtype), w.to(dtype).requires_grad_()
        lp = torch.log_softmax((xs @ ws.t()).float(), -1)
        ok = y >= 0
        logp = lp.gather(1, torch.where(ok, y, 0)[:, None])[:, 0] * ok
        ent = -(lp.exp() * lp).sum(-1)
        ((logp * gl.to(lp.dtype)).sum() + (ent * gh.to(lp.dtype)).sum()).backward()
        return ws.grad.double()

    exact = eager_dw(torch.float64)
    eager_err = (eager_dw(torch.bfloat16) - exact).norm() / exact.norm()
    for chunk in (1, 16, 512):
        *_, dw, _ = linear_logprob_entropy_with_grad(x, w, y, lambda i, j, *_: (gl[i:j], gh[i:j]),
                                                     chunk_size=chunk, backend=backend)
        assert dw.dtype == torch.bfloat16
        assert (dw.double() - exact).norm() / exact.norm() < 1.5 * eager_err, chunk


@pytest.mark.parametrize("seed", range(5))
def test_default_chunks_are_few_and_balanced(seed):
    """Default chunking: the fewest chunks that fit the budget (with its slack), of near-equal size."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        n = int(torch.randint(1, 20_000, (1,), generator=g))
        v = int(torch.randint(1, 200_000, (1,), generator=g))
        itemsize = int(torch.randint(1, 9, (1,), generator=g))
        budget = int(torch.randint(1, 1 << 28, (1,), generator=g))
        rows = balanced_chunk_rows(n, v, itemsize, budget)
        cap = max(1, int(max(1, budget // (v * itemsize)) * CHUNK_SLACK))
        chunks = -(-n // rows)
        assert 1 <= rows <= min(n, cap)
        assert chunks == -(-n // cap)  # no more chunks than the budget forces
        assert n - (chunks - 1) * rows >= rows - chunks  # no tiny tail chunk


def test_default_chunks_of_4096_rows_are_equal():
    """The case that motivated balancing: 4,096 bf16 rows of a 49,152 vocabulary at a 128 MB budget used to
    be 1,365 + 1,365 + 1,365 + 1 rows. At today's budgets (192 MB half, 128 MB fp32): 2 x 2,048 and 6 x 683."""
    assert cpu_chunk_rows(4096, 49152, torch.bfloat16) == 2048
    assert cpu_chunk_rows(4096, 49152, torch.float32) == 683
    assert cpu_chunk_rows(4096, 49152, torch.float16) == 2048


def test_rejects_mismatched_dtypes():
    with pytest.raises(TypeError):
        linear_logprob_entropy(torch.randn(3, 4), torch.randn(5, 4).bfloat16(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        linear_logprob_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))


def test_torch_compile_without_inductor_warns_and_runs_the_eager_epilogue(monkeypatch):
    """A machine where inductor cannot build (no C++ compiler): a RuntimeWarning that says so, and the eager
    epilogue's numbers (and gradients), not an exception halfway through a training step."""

    def no_compiler(fn, **_):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")

        return fail

    x, w, b, y = _inputs(torch.float32, bias=True)
    gl, gh = torch.randn(N), torch.randn(N)
    linear_cpu._inductor_epilogue.cache_clear()
    monkeypatch.setattr(torch, "compile", no_compiler)
    try:
        assert "no C++ compiler found" in linear_cpu.compiled_epilogue_unavailable()
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*eager epilogue"):
            got = linear_logprob_entropy_with_grad(x, w, y, lambda i, j, *_: (gl[i:j], gh[i:j]), b, chunk_size=16,
                                                   backend="torch_compile")
    finally:
        linear_cpu._inductor_epilogue.cache_clear()
    want = linear_logprob_entropy_with_grad(x, w, y, lambda i, j, *_: (gl[i:j], gh[i:j]), b, chunk_size=16,
                                            backend="torch")
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_backend_names_are_checked():
    x, w, _b, y = _inputs(torch.float32, bias=False)
    with pytest.raises(ValueError, match="torch_compile"):
        linear_logprob_entropy_stats(x, w, y, backend="inductor")


def test_env_switch_selects_the_compiled_epilogue(monkeypatch):
    """SPEAR_KERNELS_BACKEND=torch_compile (how training on CPU opts in) reaches the op's default backend."""
    _needs_inductor("torch_compile")
    calls = []
    compiled_chunk = linear_cpu._compiled_chunk

    def spy(*args, **kwargs):
        calls.append(1)
        return compiled_chunk(*args, **kwargs)

    monkeypatch.setattr(linear_cpu, "_compiled_chunk", spy)
    x, w, _b, y = _inputs(torch.float32, bias=False)
    monkeypatch.setenv("SPEAR_KERNELS_BACKEND", "torch_compile")
    compiled = linear_logprob_entropy_stats(x, w, y, chunk_size=16)
    assert len(calls) == 3  # 45 rows in chunks of 16
    monkeypatch.setenv("SPEAR_KERNELS_BACKEND", "torch")
    eager = linear_logprob_entropy_stats(x, w, y, chunk_size=16)
    assert len(calls) == 3
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=5e-5, rtol=1e-5)
