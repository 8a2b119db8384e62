"""Non-finite values: padded rows must not poison gradients; ranking refuses NaN/inf scores."""

import math

import pyarrow as pa
import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from alro_ray.config import load_config
from alro_ray.errors import NonFiniteError
from alro_ray.data.dataset import SAMPLE_SCHEMA
from alro_ray.data.prepare import RenderTokenize, item_table
from alro_ray.data.samples import user_samples
from alro_ray.data.synthetic import generate
from alro_ray.model.loading import add_lora, load_base_model
from alro_ray.model.padding import attention_mask_for, left_pad, positions
from alro_ray.rank.evaluation import prompt_ids, rank_rows
from alro_ray.rank.ranking import bootstrap_orders, free_batch, rank_batch, refuse_nonfinite
from alro_ray.train.losses import (
    literal_permutation_loss,
    permutation_loss,
    rank_loss_from_slots,
    slot_probabilities,
)
from alro_ray.train.objective import collate, compute_losses


def cuda_like_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA with the arithmetic of CUDA's memory-efficient kernel (PyTorch's mem_eff_attention):
    the forward stores lse = max + log(sum) per query, -inf for a query that sees no key, and
    writes 0 for its output; the backward recomputes P = exp(S - lse), NaN for that query.
    CPU's SDPA returns 0 there in both directions, so on CPU this stands in for the GPU kernel."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = (query @ key.transpose(-1, -2)).float() * scaling
    if attention_mask is None:
        q, kv = scores.shape[-2:]
        attention_mask = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)
    scores = scores + torch.where(attention_mask, 0.0, float("-inf"))  # a bias, as the kernel adds it
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.where(torch.isinf(lse), 0.0, torch.exp(scores - lse))
    return (p.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def uneven():
    """Three training rows of very different lengths (history 1, 30 and 8): in a batch the
    shortest is mostly padding. A tiny Llama with a LoRA adapter that matters."""
    cfg = load_config("configs/tiny.yaml", ["model.lora.dropout=0.0", "loss.alpha=1.0", "loss.beta=1.0",
                                            "data.synthetic.min_interactions=40",
                                            "data.synthetic.max_interactions=45"])
    source = generate(cfg.data.synthetic)
    items, _ = item_table(source, cfg)
    df = source.interactions.sort_values(["user", "timestamp", "item"])
    rows = []
    for history, (user, g) in zip([1, 30, 8], df.groupby("user")):
        rows += user_samples(user, g["item"].tolist(), g["rating"].tolist(), g["timestamp"].tolist(), split="train",
                             history=history, candidates=5, windows=1, permutations=2, seed=0)[:1]
    render = RenderTokenize("tiny-random", None, 5, items, source.attribute_name, source.domain_plural)
    table = render(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)).to_pydict()
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return cfg, table, model, render.tok


def _row_dicts(columns: dict) -> list[dict]:
    """Column dict (as collate takes it) -> row dicts (as ranking takes them)."""
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _bf16_step(uneven, shared_prefix):
    cfg, rows, model, tok = uneven
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = compute_losses(model, collate(rows, perm_index=1), torch.tensor(tok.identifier_ids), cfg.loss,
                               tok.tokenizer.pad_token_id, len(tok.header_ids), shared_prefix=shared_prefix)
    terms.total.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return terms, bad


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_padding_rows_do_not_poison_gradients(uneven, shared_prefix, monkeypatch):
    cfg, rows, model, tok = uneven
    lengths = [len(r) for r in rows["input_ids"]]
    assert max(lengths) > 3 * min(lengths)  # the short row is mostly padding
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", cuda_like_sdpa)
    assert model.config._attn_implementation == "sdpa"

    # The planted mechanism: with the plain 2D padding mask, this kernel gives a finite loss and
    # NaN gradients (what training on a GPU showed). Checked here so the test cannot pass vacuously.
    ids, mask = left_pad(rows["input_ids"], tok.tokenizer.pad_token_id, "cpu")
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=3).logits
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    terms, bad = _bf16_step(uneven, shared_prefix)
    assert all(torch.isfinite(getattr(terms, k)) for k in ("total", "sft", "rank", "perm"))
    assert terms.rank > 0 and terms.perm > 0
    assert bad == []


def test_attention_mask_for_fills_only_padding_queries(uneven):
    model = uneven[2]
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    full = attention_mask_for(model, mask, 4)
    assert full.shape == (2, 1, 4, 4) and full.dtype == torch.bool
    # padding queries 0 and 1 of row 0 see their causal window; real queries 2, 3 only keys 2, 3
    assert full[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert full[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # the last 2 columns as queries (a continuation after a cache): same rows 2, 3
    assert torch.equal(attention_mask_for(model, mask, 2), full[:, :, 2:])
    assert attention_mask_for(model, torch.ones(2, 4, dtype=torch.long), 4).shape == (2, 4)  # unpadded: as is


def test_padding_mask_keeps_real_positions_exact(uneven):
    """Real SDPA, fp32: the 4D mask gives the same logits at every real position as the 2D one."""
    _, rows, model, tok = uneven
    ids, mask = left_pad(rows["input_ids"], tok.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        b = model(input_ids=ids, attention_mask=attention_mask_for(model, mask, ids.shape[1]),
                  position_ids=positions(mask)).logits
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)


@pytest.mark.parametrize("mode", ["vocab", "identifiers"])
def test_losses_keep_finite_gradients_when_slot_probabilities_underflow(mode):
    """log(0) in the permutation term would give inf * 0 = NaN in backward: identifier logits
    far below the rest of the vocabulary make every vocab-mode slot probability underflow."""
    torch.manual_seed(0)
    B, T, V = 2, 8, 40
    ident, slots = torch.arange(10, 15), torch.tensor([[3, 4, 5, 6, 7]] * B)
    for low in (-200.0, -100.0, -90.0):
        for cols in (slice(10, 14), slice(10, 15)):  # four of the five identifiers underflow, then all five
            x = torch.randn(B, T, V)
            x[:, :, cols] = low
            for dtype in (torch.float32, torch.bfloat16):
                a = x.to(dtype).detach().clone().requires_grad_()
                b = x.flip(1).to(dtype).detach().requires_grad_()
                y, yp = slot_probabilities(a, slots, ident, mode), slot_probabilities(b, slots, ident, mode)
                loss = (rank_loss_from_slots(y, torch.tensor([[5.0, 3, 3, 1, 0], [2, 2, 2, 2, 2]]), 2.0)
                        + permutation_loss(y, yp, detach_reference=False)
                        + literal_permutation_loss(y[:, :, 0], yp[:, :, 0], detach_reference=False))
                loss.backward()
                assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_permutation_losses_gradcheck():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(2, 3, 4, dtype=torch.float64), -1).requires_grad_()
    qp = torch.softmax(torch.randn(2, 3, 4, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: permutation_loss(a, b, detach_reference=False), (q, qp))
    assert torch.autograd.gradcheck(lambda a, b: literal_permutation_loss(a, b, detach_reference=False),
                                    (q[:, :, 0].detach().requires_grad_(), qp[:, :, 0].detach().requires_grad_()))
    # hand-computed: q = q' = (1/2, 1/2) gives the entropy ln 2
    half = torch.full((1, 1, 2), 0.5, dtype=torch.float64)
    assert math.isclose(float(permutation_loss(half, half)), math.log(2.0), rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# Ranking refuses non-finite scores


def _nan_model(cfg, where):
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    for name, p in model.named_parameters():
        if (where == "lora" and "lora_B" in name) or (where == "base" and name.endswith("model.norm.weight")):
            p.data.fill_(float("nan"))
    assert any(not torch.isfinite(p).all() for p in model.parameters())
    return model.eval()


def _rank_all_modes(model, rows, tok):
    """Orders of every ranking mode on `rows` (one batch each)."""
    prompts = [prompt_ids(r) for r in rows]
    ident, pad = tok.identifier_ids, tok.tokenizer.pad_token_id
    out = {mode: rank_batch(model, prompts, ident, mode, pad)[0] for mode in ("one-pass", "generate")}
    out["free"] = free_batch(model, prompts, 5, pad, tok.tokenizer.eos_token_id, tok.tokenizer, max_new_tokens=3)[0]
    out["bootstrap@2"] = bootstrap_orders(model, lambda r, perm: prompts[r], [0] * len(prompts), 5, 2, pad, ident)
    return out


def test_refuse_nonfinite_names_mode_and_rows():
    refuse_nonfinite(torch.tensor([[0.0, -1.0], [1.0, 2.0]]), "one-pass")  # finite: nothing
    with pytest.raises(NonFiniteError, match=r"one-pass ranking: .* 1 of 2 prompts .*rows \[0\].*checkpoint"):
        refuse_nonfinite(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "one-pass")
    with pytest.raises(NonFiniteError, match=r"2 of 2 prompts"):
        refuse_nonfinite(torch.tensor([[float("-inf"), 0.0], [float("inf"), 2.0]]), "generate")
    # rows no longer in use (finished free generations) are not checked
    refuse_nonfinite(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "free", rows=torch.tensor([False, True]))


def test_a_normal_model_still_ranks_in_every_mode(uneven):
    _, table, model, tok = uneven
    for mode, orders in _rank_all_modes(model.eval(), _row_dicts(table), tok).items():
        assert len(orders) == 3 and all(sorted(o) == list(range(5)) for o in orders), mode


@pytest.mark.parametrize("where", ["lora", "base"])
def test_every_ranking_mode_refuses_a_nan_model(uneven, where):
    cfg, table, _, tok = uneven
    model, rows = _nan_model(cfg, where), _row_dicts(table)
    prompts, ident, pad = [prompt_ids(r) for r in rows], tok.identifier_ids, tok.tokenizer.pad_token_id
    for mode in ("one-pass", "generate"):
        with pytest.raises(NonFiniteError, match=f"{mode} ranking: the model's scores are NaN or infinite for 3 of 3"):
            rank_batch(model, prompts, ident, mode, pad)
    with pytest.raises(NonFiniteError, match="free ranking: .*3 of 3"):
        free_batch(model, prompts, 5, pad, tok.tokenizer.eos_token_id, tok.tokenizer)
    with pytest.raises(NonFiniteError, match=r"bootstrap@2 \(each copy ranked by generate\): generate ranking"):
        bootstrap_orders(model, lambda r, perm: prompts[r], [0, 1, 2], 5, 2, pad, ident)
    # the evaluation path (also validation during training) names the users of the batch
    with pytest.raises(NonFiniteError, match=f"users: {rows[0]['user']}, {rows[1]['user']}"):
        rank_rows(model, rows, ident, pad, "one-pass", batch_size=2)
