"""Helpers for the rollout tests: the trainer-side reference log-probs, weight perturbation, chat prompts."""

from __future__ import annotations

import torch

from spear_engine.rollout.hf import apply_top_k_top_p

TOL_LOGP = 1e-4
"""Max |Δ log-prob| per token between engines / engine and trainer in fp32. Measured: ≤ 1.5e-5 on the
tiny model and ≤ 3e-5 on SmolLM2-135M (different GEMM kernels — oneDNN in vLLM, MKL in torch — and
batch shapes change the float32 rounding of 30 layers and a 49k-way logsumexp); 1e-4 leaves ~3x."""


def teacher_forced_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float = 1.0,
                            top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """The trainer's numbers: log-probs of ``tokens`` after ``prompt`` from one forward pass, under the
    engines' sampling distribution (temperature, then top-k/top-p; temperature 0 means 1)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    if temperature > 0:
        logits = apply_top_k_top_p(logits / temperature, top_k, top_p)
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to every parameter, in place (a stand-in for a training update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    out = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out
