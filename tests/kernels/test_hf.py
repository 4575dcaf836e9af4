"""token_logprobs_entropy (spear_kernels.hf) against the model's own forward: a tiny, randomly initialised
Llama built from a config (no download), its full logits through the plain-torch oracle. Values and
gradients of every parameter, padded rows, ignored labels, tied and untied heads, fp32 and bf16."""

import copy

import pytest
import torch
from conftest import rel_err

from spear_kernels import causal_lm_parts, token_logprobs_entropy
from spear_kernels.reference import logprob_entropy_ref

transformers = pytest.importorskip("transformers")

V, B, T = 97, 3, 13  # odd vocabulary and length
# (log-prob / entropy absolute, gradient relative) tolerances. bf16: the model's own head rounds its logits
# to bf16, the fused head computes the target logit in fp32 — both are bf16-accurate, not identical.
TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (3e-2, 2e-2)}


def _model(dtype=torch.float32, tie=False, **extra):
    torch.manual_seed(7)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, **extra,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(dtype)
    if not tie:  # a non-trivial lm_head bias-free weight, independent of the embeddings
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    return model


def _inputs():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    return ids, mask, labels


def _oracle(model, ids, mask, labels, temperature, scale=1.0):
    """Full logits of ``model(...)``, shifted, through the fp32 oracle; 0 where nothing is predicted."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1] * scale
    lp, ent = logprob_entropy_ref(logits, labels[:, 1:], temperature)
    valid = (labels[:, 1:] != -100) & (mask[:, 1:] != 0)
    zero = torch.zeros(B, 1)
    lp = torch.cat([zero, torch.where(valid, lp, 0.0)], 1)
    ent = torch.cat([zero, torch.where(valid, ent, 0.0)], 1)
    return lp, ent, torch.cat([torch.zeros(B, 1, dtype=torch.bool), valid], 1)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_token_logprobs_entropy_matches_full_logits(dtype, tie):
    model = _model(dtype, tie)
    ref_model = copy.deepcopy(model)
    ids, mask, labels = _inputs()
    lp, ent = token_logprobs_entropy(model, ids, mask, labels, temperature=0.7, chunk_size=8)
    rl, re, valid = _oracle(ref_model, ids, mask, labels, 0.7)
    assert lp.shape == (B, T) and ent.shape == (B, T) and lp.dtype == torch.float32
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()
    vt, gt = TOL[dtype]
    assert (lp - rl).abs().max() < vt and (ent - re).abs().max() < vt
    g1, g2 = torch.randn(B, T), torch.randn(B, T)  # arbitrary upstream gradients on both outputs
    ((lp * g1).sum() + (ent * g2).sum()).backward()
    ((rl * g1).sum() + (re * g2).sum()).backward()
    got, want = _grads(model), _grads(ref_model)
    assert got.keys() == want.keys() and "model.embed_tokens.weight" in got
    assert tie or "lm_head.weight" in got
    for name in want:
        assert got[name].dtype == dtype
        assert rel_err(got[name], want[name]) < gt, name


def test_autocast_bf16_matches_the_models_autocast_forward():
    """fp32 weights under bf16 autocast (mixed precision training): the head runs in bf16 like the model's
    own, and the fp32 master lm_head weight gets an fp32 gradient."""
    model = _model()
    ids, mask, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = token_logprobs_entropy(model, ids, mask, labels)
        rl, re, _ = _oracle(model, ids, mask, labels, 1.0)
    vt = TOL[torch.bfloat16][0]
    assert (lp - rl).abs().max() < vt and (ent - re).abs().max() < vt
    lp.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32 and model.lm_head.weight.grad.abs().max() > 0


def test_logits_to_keep_gives_the_last_columns():
    """TRL's convention: ``logits_to_keep=k`` → the log-probs of the last k tokens, [B, k]."""
    model = _model()
    ids, mask, labels = _inputs()
    with torch.no_grad():
        full_lp, full_ent = token_logprobs_entropy(model, ids, mask, labels)
        lp, ent = token_logprobs_entropy(model, ids, mask, labels, logits_to_keep=4)
    assert lp.shape == (B, 4)
    torch.testing.assert_close(lp, full_lp[:, -4:])
    torch.testing.assert_close(ent, full_ent[:, -4:])


def test_logit_scale_and_defaults():
    """``labels=None`` trains on every attended token; ``logit_scale`` multiplies the head's logits."""
    model = _model()
    ids, mask, _ = _inputs()
    with torch.no_grad():
        lp, ent = token_logprobs_entropy(model, ids, mask, logit_scale=2.5, temperature=1.3)
        rl, re, _ = _oracle(model, ids, mask, ids, 1.3, scale=2.5)
    torch.testing.assert_close(lp, rl, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent, re, atol=2e-5, rtol=0)


def test_no_valid_label_still_backpropagates():
    model = _model()
    ids, mask, _ = _inputs()
    lp, ent = token_logprobs_entropy(model, ids, mask, torch.full_like(ids, -100))
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()  # no error; zero gradients
    assert all((p.grad == 0).all() for p in model.parameters() if p.grad is not None)


def test_refuses_what_it_cannot_reproduce():
    ids, mask, _ = _inputs()
    with pytest.raises(NotImplementedError, match="soft-caps"):
        token_logprobs_entropy(_model(final_logit_softcapping=30.0), ids, mask)
    with pytest.raises(ValueError, match="logits_scaling"):
        token_logprobs_entropy(_model(logits_scaling=4.0), ids, mask)
    with pytest.raises(ValueError, match="logits_to_keep"):
        token_logprobs_entropy(_model(), ids, mask, logits_to_keep=T)
    with pytest.raises(TypeError, match="output head"):
        causal_lm_parts(torch.nn.Linear(3, 3))
