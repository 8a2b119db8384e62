"""The offline model cache: judged by content, rebuilt when incomplete, built once under a lock,
and complete even when built inside a distributed worker that is not rank 0."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from alro_ray.config import ModelConfig
from alro_ray.model.loading import SMOLLM2, _model_problem, load_base_model, load_tokenizer, smollm2_dir


def _leave_a_crashed_build(cache, name):
    """What the Ray Train run of issue 10 left: a marker, some files, and an orphaned temp dir."""
    broken = cache / name
    broken.mkdir(parents=True)
    (broken / "DONE").write_text("ok\n")
    (broken / "chat_template.jinja").write_text("{{ messages }}")
    (cache / f"{name}.x1y2z3").mkdir()
    return broken


def test_model_problem_reads_content_not_markers(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "DONE").write_text("ok\n")
    assert "config.json" in _model_problem(d)
    (d / "config.json").write_text(json.dumps({"vocab_size": 3}))
    assert _model_problem(d) == "config.json has no model_type"
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model.safetensors unreadable" in _model_problem(d)
    (d / "model.safetensors").write_bytes(b"truncated")
    assert "model.safetensors unreadable" in _model_problem(d)
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    assert "lack model.embed_tokens.weight" in _model_problem(d)
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    assert _model_problem(d) == "no tokenizer_config.json"


def test_incomplete_tokenizer_cache_is_rebuilt(tmp_path, caplog):
    broken = _leave_a_crashed_build(tmp_path, f"{SMOLLM2}-tokenizer")
    with caplog.at_level(logging.WARNING, logger="alro_ray"):
        tok = load_tokenizer("tiny-random", str(tmp_path))
    assert "incomplete (no tokenizer_config.json): rebuilding" in caplog.text
    assert tok.decode(tok("Neon Harbor").input_ids) == "Neon Harbor"
    assert (broken / "tokenizer.json").is_file()
    assert not (tmp_path / f"{SMOLLM2}-tokenizer.x1y2z3").exists()


def test_concurrent_builders_wait_for_one_build(tmp_path):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from alro_ray.model.loading import load_tokenizer; "
            f"print(len(load_tokenizer('smollm2-135m', {str(tmp_path)!r})))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum(o.count("building the model cache") for o in outputs) == 1, outputs
    assert [o.strip().splitlines()[-1] for o in outputs] == ["49152", "49152"]


@pytest.mark.slow  # converts the GGUF weights: 30 s alone, 2 min on a busy machine
def test_marker_without_weights_is_rebuilt_even_on_a_non_zero_rank(tmp_path, caplog):
    """Issue 10: inside a Ray Train worker, transformers' save_pretrained writes config and weights
    on rank 0 only; a rank-1 build was cached with a marker and no weights."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    broken = _leave_a_crashed_build(tmp_path, SMOLLM2)
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        with caplog.at_level(logging.WARNING, logger="alro_ray"):
            model = load_base_model(ModelConfig(name=SMOLLM2, cache_dir=str(tmp_path)))
    finally:
        dist.destroy_process_group()
    assert "incomplete (config.json unreadable" in caplog.text
    assert _model_problem(broken) is None
    assert not (broken / "DONE").exists() and not (tmp_path / f"{SMOLLM2}.x1y2z3").exists()
    assert smollm2_dir(str(tmp_path), with_model=False) == broken  # the tokenizer comes from it too
    tok = load_tokenizer(SMOLLM2, str(tmp_path))
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " Paris"
