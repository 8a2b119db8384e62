"""The frozen layers' states below LoRA, read once (train/lower_states.py, train.cache_lower_layers):
the top layers run from them give the full forward's logits, the objective's losses and gradients
are those of the plain path, the lower layers run once per sequence, and the stored states are
read back only under their own key."""

import dataclasses
import logging

import pytest
import torch

from conftest import objective_rows
from alro_ray.config import ConfigError, load_config
from alro_ray.model.hidden import forward_from_layer, hidden_states_at
from alro_ray.model.loading import add_lora, load_base_model
from alro_ray.model.padding import attention_mask_for, left_pad, positions
from alro_ray.train.lower_states import LowerStates, for_worker, lowest_lora_layer
from alro_ray.train.objective import collate, compute_losses


@pytest.fixture(scope="module")
def setup():
    """configs/tiny.yaml (2 decoder layers) with LoRA on the top one, LoRA B non-zero."""
    return objective_rows("model.lora.layers=1")


def _losses(setup, lower=None):
    cfg, rows, model, tok = setup
    model.zero_grad()
    terms = compute_losses(model, collate(rows, perm_index=1), torch.tensor(tok.identifier_ids), cfg.loss,
                           tok.tokenizer.pad_token_id, len(tok.header_ids), lower=lower)
    terms.total.backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _layer_zero_runs(model) -> list:
    runs = []
    handle = model.base_model.model.model.layers[0].register_forward_hook(lambda *a: runs.append(1))
    return runs, handle


def test_the_top_layers_from_stored_states_give_the_full_forwards_logits(setup):
    _, rows, model, tok = setup
    ids, mask = left_pad(rows["input_ids"], tok.tokenizer.pad_token_id, "cpu")
    am, pos = attention_mask_for(model, mask, ids.shape[1]), positions(mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=am, position_ids=pos, logits_to_keep=7).logits
        states = hidden_states_at(model, 1, ids, mask)
        top = forward_from_layer(model, 1, states, attention_mask=am, position_ids=pos, logits_to_keep=7).logits
    assert torch.allclose(full, top, atol=1e-5)
    assert len(model.base_model.model.model.layers) == 2  # the layer list is whole again
    with pytest.raises(ValueError, match="layer 2 must be in 0 .. 1"):
        forward_from_layer(model, 2, states)


def test_the_objective_on_stored_states_has_the_plain_losses_and_gradients_and_reads_each_sequence_once(setup):
    model = setup[2]
    plain, g_plain = _losses(setup)  # the shared-prefix forward over every layer
    lower = LowerStates(lowest_lora_layer(model))
    assert lower.layer == 1
    runs, handle = _layer_zero_runs(model)
    try:
        first, g_first = _losses(setup, lower)
        assert len(runs) == 1 and lower.read == 6  # one no-grad batch: 3 original and 3 permuted prompts
        again, g_again = _losses(setup, lower)
        assert len(runs) == 1 and lower.read == 6  # read back: layer 0 did not run again
    finally:
        handle.remove()
    for terms, grads in ((first, g_first), (again, g_again)):
        for name in ("total", "sft", "rank", "perm"):
            assert torch.allclose(getattr(terms, name), getattr(plain, name), atol=1e-5), name
        assert grads.keys() == g_plain.keys() and len(grads) > 0
        for n in grads:
            assert torch.allclose(grads[n], g_plain[n], atol=1e-5, rtol=1e-3), n
    assert plain.perm > 0 and plain.rank > 0


def test_stored_states_are_read_back_under_their_own_key_only(setup, tmp_path, caplog):
    cfg, rows, model, tok = setup
    store = tmp_path / "frozen-states"
    lower = for_worker(model, tmp_path / "data", store, rank=1, world=2)
    assert lower.path.name.startswith("lower-") and lower.path.name.endswith("-1of2.pt")
    assert not lower.save()  # nothing read yet
    states, _ = lower.padded(model, rows["input_ids"], tok.tokenizer.pad_token_id, "cpu")
    assert lower.save() and not lower.save()  # saved once; nothing new since
    back = for_worker(model, tmp_path / "data", store, rank=1, world=2)
    assert back.states.keys() == lower.states.keys() and back.read == 0
    again, _ = back.padded(model, rows["input_ids"], tok.tokenizer.pad_token_id, "cpu")
    assert torch.equal(again, states) and back.read == 0
    # other data or other frozen weights: another file, nothing read back
    assert for_worker(model, tmp_path / "other", store, rank=1, world=2).states == {}
    other = LowerStates(lower.layer, "another key", lower.path)
    assert other.states == {}
    lower.path.write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="alro_ray"):
        assert LowerStates(lower.layer, lower.key, lower.path).states == {}
    assert "unreadable" in caplog.text


def test_a_trained_parameter_below_or_outside_the_layers_is_refused(setup):
    cfg = setup[0]
    everywhere = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, layers=None))
    assert lowest_lora_layer(add_lora(load_base_model(everywhere), everywhere)) == 0
    model = add_lora(load_base_model(cfg.model), cfg.model)
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="outside the decoder layers"):
        lowest_lora_layer(model)


@pytest.mark.parametrize("overrides, why", [
    ([], "model.lora.layers is not set"),
    (["model.lora.layers=1", "loss.objective=score", "model.head.kind=linear", "train.eval_mode=score"],
     "loss.objective=score"),
    (["model.lora.layers=1", "train.gradient_checkpointing=true"], "gradient_checkpointing is on"),
])
def test_the_config_refuses_what_the_lower_states_cannot_serve(overrides, why):
    with pytest.raises(ConfigError, match=why):
        load_config("configs/tiny.yaml", ["train.cache_lower_layers=true", *overrides])
    assert load_config("configs/tiny.yaml", ["train.cache_lower_layers=true", "model.lora.layers=1"])
