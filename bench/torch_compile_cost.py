"""What ``backend="torch_compile"`` costs at first use: the fused loss's first call (inductor compiles the CPU
epilogue) against its second, fp32 then bf16, from an empty inductor cache unless ``--keep-cache``.

    python bench/torch_compile_cost.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep-cache", action="store_true", help="use inductor's usual on-disk cache")
    args = p.parse_args(argv)
    if not args.keep_cache:  # before torch is imported: inductor reads it once
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-empty-")
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernels_import import import_spear_kernels

    sk = import_spear_kernels()
    torch.manual_seed(0)
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"cache: {'kept' if args.keep_cache else 'empty'}")  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(300, 64).to(dtype)
        w = (torch.randn(1000, 64) * 0.3).to(dtype)
        y = torch.randint(0, 1000, (1, 300))
        adv, mask = torch.randn(1, 300), torch.ones(1, 300)
        seconds = []
        for _ in range(2):
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            start = time.perf_counter()
            out = sk.fused_linear_policy_loss(xs[None], ws, y, None, adv, mask, loss_mode="vanilla",
                                              entropy_coeff=0.01, backend="torch_compile")  # fmt: skip
            out.loss.backward()
            seconds.append(time.perf_counter() - start)
        print(f"{str(dtype).removeprefix('torch.')}: first call {seconds[0]:.1f} s, second {seconds[1]:.3f} s")


if __name__ == "__main__":
    main()
