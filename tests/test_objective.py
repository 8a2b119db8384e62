"""The training objective on a real (tiny) model: the shared-prefix pass is exact, masks line up."""

import copy
import dataclasses

import pytest
import torch

from conftest import objective_rows
from alro_ray.config import ConfigError, load_config
from alro_ray.model.loading import add_lora, load_base_model
from alro_ray.train.objective import checkpointing, collate, compute_losses


@pytest.fixture(scope="module")
def setup():
    return objective_rows()


def _losses(setup, shared_prefix, perm_index=1):
    cfg, rows, model, tok = setup
    model.zero_grad()
    batch = collate(rows, perm_index=perm_index)
    terms = compute_losses(model, batch, torch.tensor(tok.identifier_ids), cfg.loss,
                           tok.tokenizer.pad_token_id, len(tok.header_ids), shared_prefix=shared_prefix)
    terms.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads


def test_shared_prefix_pass_equals_two_full_passes(setup):
    a, ga = _losses(setup, shared_prefix=True)
    b, gb = _losses(setup, shared_prefix=False)
    for name in ("total", "sft", "rank", "perm"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    assert a.perm > 0 and a.rank > 0
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-3), n


def test_gradient_checkpointing_gives_the_shared_prefix_losses_and_gradients(setup):
    """Checkpointed layers drop the KV cache the shared prefix would continue from (the step
    failed on a None cache: configs/paper_gpu.yaml's setting); under checkpointing the two full
    passes run instead, with the same losses and gradients."""
    cfg, rows, model, tok = setup
    a, ga = _losses(setup, shared_prefix=True)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()  # as train/worker.py does
    checkpointed.enable_input_require_grads()
    checkpointed.train()
    assert checkpointing(checkpointed) and not checkpointing(model)
    with torch.no_grad():  # nothing to recompute without gradients: the cache stays (generation)
        assert not checkpointing(checkpointed)
    b, gb = _losses((cfg, rows, checkpointed, tok), shared_prefix=True)
    for name in ("total", "sft", "rank", "perm"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-3), n


def test_sft_matches_a_plain_full_sequence_loss(setup):
    """The tail-only logits give the same SFT loss as the model's own loss over the whole sequence."""
    cfg, rows, model, tok = setup
    sft_only = dataclasses.replace(cfg.loss, alpha=0.0, beta=0.0)
    ids = torch.tensor([list(rows["input_ids"][0])])
    labels = ids.clone()
    labels[0, torch.tensor(list(rows["labels_mask"][0])) == 0] = -100
    with torch.no_grad():
        one = compute_losses(model, collate({k: v[:1] for k, v in rows.items()}, None),
                             torch.tensor(tok.identifier_ids), sft_only, tok.tokenizer.pad_token_id,
                             len(tok.header_ids))
        ref = model(input_ids=ids, labels=labels).loss
    assert one.sft > 0 and torch.allclose(one.sft, ref, atol=1e-5)
    # a batch of three, padded, averages over all response tokens: not equal to row 0 alone
    with torch.no_grad():
        three = compute_losses(model, collate(rows, None), torch.tensor(tok.identifier_ids), sft_only,
                               tok.tokenizer.pad_token_id, len(tok.header_ids))
    assert torch.isfinite(three.sft) and not torch.allclose(three.sft, one.sft)


def test_beta_without_permutation_is_a_clear_error(setup):
    cfg, rows, model, tok = setup
    with pytest.raises(ValueError, match="needs a batch collated with a permutation"):
        compute_losses(model, collate(rows, None), torch.tensor(tok.identifier_ids), cfg.loss,
                       tok.tokenizer.pad_token_id, len(tok.header_ids))


def test_lora_on_the_top_layers_only_trains_those_and_stops_backward_below_them(setup):
    """model.lora.layers=k: adapters in the top k decoder layers only, and autograd never reaches
    the layers below (their inputs need no gradient), which is where the time goes."""
    cfg, rows, _, tok = setup
    n = cfg.model.tiny.num_layers
    top = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, layers=1))
    model = add_lora(load_base_model(top), top)
    trainable = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {str(n - 1)}
    reached = []
    lower = model.base_model.model.model.layers[0]
    lower.register_forward_hook(lambda m, i, out: reached.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    batch = collate(rows, perm_index=None)
    sft = dataclasses.replace(cfg.loss, alpha=0.0, beta=0.0)
    terms = compute_losses(model, batch, torch.tensor(tok.identifier_ids), sft, tok.tokenizer.pad_token_id,
                           len(tok.header_ids))
    terms.total.backward()
    assert reached and not any(reached)  # layer 0's output is outside the autograd graph
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_layers_beyond_the_model_are_refused(setup):
    cfg = setup[0]
    too_many = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, layers=99))
    with pytest.raises(ConfigError, match="model.lora.layers=99, but tiny-random has 2 decoder layers"):
        add_lora(load_base_model(too_many), too_many)


def test_permutation_rate_keeps_the_expected_beta_and_is_seeded():
    from alro_ray.train.objective import step_loss

    cfg = load_config(None, ["loss.beta=0.01", "loss.permutation_rate=0.25"]).loss
    betas = [step_loss(cfg, 0, epoch=1, step=s).beta for s in range(4000)]
    assert set(betas) == {0.0, 0.04}  # beta / rate where the permuted pass runs, 0 elsewhere
    assert abs(sum(betas) / len(betas) - 0.01) < 0.001  # the same gradient in expectation
    assert betas == [step_loss(cfg, 0, epoch=1, step=s).beta for s in range(4000)]
    assert betas != [step_loss(cfg, 1, epoch=1, step=s).beta for s in range(4000)]
    every = load_config(None, ["loss.beta=0.01"]).loss
    assert step_loss(every, 0, 0, 0) is every  # the paper's setting: every micro-step
