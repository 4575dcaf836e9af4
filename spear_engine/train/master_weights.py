"""fp32 master weights for a module trained in bf16/fp16 by the plain torch backend.

With ``model.dtype=bfloat16`` the forward and backward run on bf16 weights and activations (no autocast
casts, half the bytes in every elementwise op), but an optimizer stepping the bf16 weights themselves
loses the update: a weight of 0.02 holds 2^-9 of relative precision (4e-5), so an Adam step of lr 1e-6
rounds away and training silently stops. As DeepSpeed's bf16 mode and verl's FSDP mixed precision do,
the optimizer owns fp32 copies of the trainable weights instead:

- each bf16 gradient is added into its copy's fp32 ``.grad`` as soon as autograd has accumulated it (a
  post-accumulate hook), and the bf16 ``.grad`` is dropped, so micro-batches accumulate in fp32;
- clipping and the optimizer step run on the copies; :meth:`MasterWeights.publish` rounds them back into
  the module's weights;
- checkpoints hold the copies (:meth:`MasterWeights.full_precision_state`), so a resumed run continues
  from the exact fp32 weights, not their bf16 rounding.
"""

from __future__ import annotations

from typing import Any

import torch


def needs_master_weights(params: list[torch.nn.Parameter]) -> bool:
    """Whether any trainable parameter is stored in a precision an optimizer should not step directly."""
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in params)


class MasterWeights:
    """fp32 copies of ``params`` (the module's trainable weights, bf16/fp16) that gradients accumulate into
    and the optimizer steps."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.masters = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params]
        self._by_id = {id(p): m for p, m in zip(params, self.masters, strict=True)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate_into(m))
                       for p, m in zip(params, self.masters, strict=True)]  # fmt: skip

    @staticmethod
    def _accumulate_into(master: torch.nn.Parameter) -> Any:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.to(torch.float32)
            if master.grad is None:
                master.grad = grad if grad is not param.grad else grad.clone()
            else:
                master.grad.add_(grad)
            param.grad = None

        return hook

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            p.grad = m.grad = None

    @torch.no_grad()
    def publish(self) -> None:
        """Round the fp32 copies into the module's weights (after an optimizer step or a load)."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)

    def full_precision_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with every trainable weight replaced by its fp32 copy (a tied weight under
        each of its names)."""
        state = module.state_dict(keep_vars=True)
        return {name: self._by_id.get(id(t), t).detach() for name, t in state.items()}

    @torch.no_grad()
    def load_full_precision(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Set the copies from a state (fp32 copies from a checkpoint, or weights of any dtype), then publish."""
        for name, tensor in module.state_dict(keep_vars=True).items():
            master = self._by_id.get(id(tensor))
            if master is not None and name in state:
                master.copy_(state[name])
        self.publish()
