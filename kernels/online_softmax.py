"""The online-softmax fold shared by the log-prob / entropy kernels (``@triton.jit``, device side).

A row's statistics are accumulated over vocabulary blocks as a running max ``m``, ``s = Σexp(z − m)``,
``t = Σexp(z − m)·(z − m)`` and the target logit ``zy``; then ``lse = m + log s`` and the entropy is
``log s − t / s``. ``t`` is kept relative to the running max, so logits of ±1e4 cost no precision.
"""

from __future__ import annotations

from .utils import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def online_softmax_fold(z, valid, hit, m, s, t, zy, AXIS: tl.constexpr):
        """Fold one block of scaled logits ``z`` into the running (m, s, t, zy), reducing over ``AXIS``.

        ``z`` holds -inf where ``valid`` is false; ``hit`` marks the target column. ``valid`` and ``hit``
        broadcast against ``z``; (m, s, t, zy) have ``z``'s shape without ``AXIS``. Returns the new four.
        """
        bm = tl.max(z, AXIS)
        d = tl.where(valid, z - tl.expand_dims(bm, AXIS), 0.0)
        e = tl.where(valid, tl.exp(d), 0.0)
        bs = tl.sum(e, AXIS)
        bt = tl.sum(e * d, AXIS)
        zy += tl.sum(tl.where(hit, z, 0.0), AXIS)
        new_m = tl.maximum(m, bm)
        a1 = tl.exp(m - new_m)
        a2 = tl.exp(bm - new_m)
        t = a1 * (t + (m - new_m) * s) + a2 * (bt + (bm - new_m) * bs)
        s = a1 * s + a2 * bs
        return new_m, s, t, zy
