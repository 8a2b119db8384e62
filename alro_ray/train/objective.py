"""One ALRO training step's forward: batch collation and the objective on a model (spec §3).

Sequences are LEFT-padded so every row's response (header, C identifiers, eos) sits at the same
offsets from the end. The model then computes logits only for that tail (`logits_to_keep`):
with a 49k vocabulary the LM head is a large share of the step, and the loss needs no other
position. The loss functions in `losses.py` are called on that tail as if it were a whole
sequence, so they stay plain functions of (logits, mask, ids, positions). Padding positions get
attention-mask rows that are never empty (`padding.attention_mask_for`): an empty row turns into
NaN gradients in CUDA's SDPA backward while the loss stays finite.

With beta > 0 the permuted prompt shares the whole history prefix with the original one. With
`shared_prefix` the prefix runs once and both candidate orders continue from its KV cache
(gradients flow through the cache), instead of two full passes; under gradient checkpointing,
which drops the cache, the two full passes (`checkpointing`).

With loss.objective=score the same pass also returns the hidden states at the candidate lines
(and at the history lines, for the head's user match), which the score head
(model/score_head.py) maps to one score per candidate.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from alro_ray.config import LossConfig
from alro_ray.compat import NEEDS_PERMUTATIONS
from alro_ray.train.losses import (
    LossTerms,
    alro_loss,
    literal_permutation_loss,
    map_scores_to_items,
    map_to_items,
    permutation_loss,
    rank_loss_from_slots,
    score_consistency_loss,
    score_rank_loss,
    sft_loss,
    slot_probabilities,
)
from alro_ray.model.hidden import forward_from_layer, forward_to_layer
from alro_ray.model.padding import attention_mask_for, left_pad, positions
from alro_ray.model.score_head import gather_hidden


@dataclass
class TrainBatch:
    """Token rows (unpadded lists) and targets of B samples; see `collate`."""

    input_ids: list[list[int]]
    slot_positions: torch.Tensor  # [B, C] in unpadded coordinates
    ratings: torch.Tensor  # [B, C] float, candidates in prompt order
    gold: torch.Tensor  # [B, C] long, prompt positions best first
    prefix_len: list[int]
    perm_input_ids: list[list[int]] | None = None
    perm_slot_positions: torch.Tensor | None = None
    perm_order: torch.Tensor | None = None  # [B, C]: original index shown at permuted position j
    users: list[str] = dataclasses.field(default_factory=list)  # named when a step is skipped

    @property
    def size(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.input_ids) + sum(len(s) for s in (self.perm_input_ids or []))

    def without_permutation(self) -> "TrainBatch":
        """This batch for a step without the permuted pass (`loss.permutation_rate`)."""
        return dataclasses.replace(self, perm_input_ids=None, perm_slot_positions=None, perm_order=None)


def collate(rows: dict, perm_index: int | None) -> TrainBatch:
    """Rows as Ray Data gives them (column -> array of per-row values). `perm_index` picks which
    of the K stored permutations to use (epoch mod K), or None for no permuted pass."""
    def ints(v) -> list[int]:
        return [int(x) for x in v]

    n = len(rows["input_ids"])
    batch = TrainBatch(
        input_ids=[ints(v) for v in rows["input_ids"]],
        slot_positions=torch.tensor([ints(v) for v in rows["slot_positions"]]),
        ratings=torch.tensor([[float(x) for x in v] for v in rows["candidate_ratings"]]),
        gold=torch.tensor([ints(v) for v in rows["gold_order"]]),
        prefix_len=[int(x) for x in rows["prefix_len"]],
        users=[str(u) for u in rows.get("user", ())],
    )
    if perm_index is not None:
        if any(len(rows["perm_orders"][b]) == 0 for b in range(n)):
            raise ValueError(NEEDS_PERMUTATIONS)
        k = [perm_index % len(rows["perm_orders"][b]) for b in range(n)]
        batch.perm_input_ids = [ints(rows["perm_input_ids"][b][k[b]]) for b in range(n)]
        batch.perm_slot_positions = torch.tensor([ints(rows["perm_slot_positions"][b][k[b]]) for b in range(n)])
        batch.perm_order = torch.tensor([ints(rows["perm_orders"][b][k[b]]) for b in range(n)])
    return batch


@dataclass
class _Tail:
    logits: torch.Tensor  # [N, R+1, V]: the last R+1 positions of each sequence
    ids: torch.Tensor  # [N, R+1]
    labels_mask: torch.Tensor  # [N, R+1]
    slots: torch.Tensor  # [N, C] slot positions in tail coordinates
    hidden: torch.Tensor | None = None  # [N, C, H] at the candidate lines (score objective)
    history: torch.Tensor | None = None  # [N, L, H] at the history lines (the head's user match)


@dataclass
class HiddenAt:
    """Which hidden states a forward returns besides the logits (score objective): `layer`'s
    states at the candidate lines of each sequence group ([B, C] positions per group, unpadded),
    and at the history lines ([B, L], unpadded) when the head reads them. The history lies in
    the prefix that both groups share, so it is read once, from the original sequences."""

    layer: int
    candidates: list[torch.Tensor]
    history: torch.Tensor | None = None


def _tail(logits, seqs, slot_positions, tail_len, device, hidden=None, history=None) -> _Tail:
    ids = torch.tensor([s[-tail_len:] for s in seqs], device=device)
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    slots = slot_positions.to(device) - (lengths - tail_len)[:, None]
    mask = torch.zeros_like(ids)
    mask[:, 1:] = 1  # the tail is the response, preceded by the prompt's last token
    return _Tail(logits, ids, mask, slots, hidden, history)


def _tail_len(batch: TrainBatch, header_len: int) -> int:
    """Positions whose logits the loss needs: the prompt's last token, the header, the C
    identifiers and eos. The same for every row, since C and the header are fixed."""
    from_first_slot = {len(s) - int(p[0]) for s, p in zip(batch.input_ids, batch.slot_positions)}
    if len(from_first_slot) != 1:
        raise ValueError(f"rows of one batch end differently after their first slot: {sorted(from_first_slot)}")
    return 1 + header_len + from_first_slot.pop()


def forward_tails(model, batch: TrainBatch, pad_id: int, header_len: int, shared_prefix: bool,
                  hidden_at: HiddenAt | None = None, logits: bool = True, lower=None) -> list[_Tail]:
    """Logits of the response tail of the original (and permuted) sequences, and the hidden
    states `hidden_at` asks for. logits False (the score head's loss alone): no logits, and the
    forward stops at `hidden_at`'s layer (model/hidden.forward_to_layer) unless gradient
    checkpointing is on (a checkpointed layer recomputes its forward in the backward) or the model
    is compiled (its stop is an exception raised inside the forward). `lower`
    (train/lower_states.LowerStates): the frozen layers' states below LoRA, read once per sequence;
    only the layers above them run (both groups in one batch: no shared prefix to save)."""
    device = next(model.parameters()).device
    tail_len = _tail_len(batch, header_len)
    seqs = [batch.input_ids] + ([batch.perm_input_ids] if batch.perm_input_ids is not None else [])
    slots = [batch.slot_positions] + ([batch.perm_slot_positions] if batch.perm_input_ids is not None else [])
    if lower is not None:
        if hidden_at is not None:
            raise ValueError("the lower layers' states serve the generative objective only")
        states, mask = lower.padded(model, [s for group in seqs for s in group], pad_id, device)
        out = forward_from_layer(model, lower.layer, states, position_ids=positions(mask), logits_to_keep=tail_len,
                                 attention_mask=attention_mask_for(model, mask, states.shape[1]))
        tail_logits = out.logits.view(len(seqs), batch.size, *out.logits.shape[1:]).unbind(0)
        return [_tail(lg, s, p, tail_len, device) for lg, s, p in zip(tail_logits, seqs, slots)]
    compiled = getattr(getattr(model, "module", model), "_compiled_call_impl", None) is not None  # Module.compile
    upto = hidden_at.layer if not logits and hidden_at is not None and not checkpointing(model) and not compiled \
        else None

    hidden, history = [None] * len(seqs), None
    if len(seqs) == 2 and shared_prefix and not checkpointing(model):
        tail_logits, hidden, history = _shared_prefix_forward(model, batch, pad_id, tail_len, device, hidden_at, upto)
    else:
        flat = [s for group in seqs for s in group]
        ids, mask = left_pad(flat, pad_id, device)
        inputs = dict(input_ids=ids, attention_mask=attention_mask_for(model, mask, ids.shape[1]),
                      position_ids=positions(mask))
        if upto is not None:
            states, tail_logits = forward_to_layer(model, upto, **inputs, use_cache=False), [None] * len(seqs)
        else:
            out = model(**inputs, logits_to_keep=tail_len, output_hidden_states=hidden_at is not None)
            tail_logits = list(out.logits.view(len(seqs), batch.size, *out.logits.shape[1:]).unbind(0))
            states = out.hidden_states[hidden_at.layer] if hidden_at is not None else None
        if hidden_at is not None:
            shift = (ids.shape[1] - torch.tensor([len(s) for s in flat]))[:, None]  # left padding shifts each row
            hidden = list(gather_hidden(states, torch.cat(hidden_at.candidates) + shift).view(
                len(seqs), batch.size, -1, states.shape[-1]).unbind(0))
            if hidden_at.history is not None:
                history = gather_hidden(states[:batch.size], hidden_at.history + shift[:batch.size])
    return [_tail(lg, s, p, tail_len, device, h, history if g == 0 else None)
            for g, (lg, s, p, h) in enumerate(zip(tail_logits, seqs, slots, hidden))]


def checkpointed_layers(model) -> bool:
    """Whether gradient checkpointing is on in any of `model`'s layers (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def checkpointing(model) -> bool:
    """Whether a forward of `model` now runs gradient-checkpointed layers. Those drop the KV cache
    (transformers sets use_cache=False in them: a cache written inside a checkpointed layer would be
    written again by the backward's recompute), so the shared prefix has no cache to continue from
    and forward_tails runs two full passes instead: the same losses, the prefix computed twice."""
    return model.training and torch.is_grad_enabled() and checkpointed_layers(model)


def _shared_prefix_forward(model, batch: TrainBatch, pad_id: int, tail_len: int, device, hidden_at=None,
                           upto: int | None = None
                           ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor | None]:
    """upto: stop both passes at that layer (no logits; the cache holds the layers below it)."""
    B = batch.size
    prefixes = [s[:p] for s, p in zip(batch.input_ids, batch.prefix_len)]
    for b in range(B):  # the permuted prompt must start with the same tokens
        assert batch.perm_input_ids[b][: batch.prefix_len[b]] == prefixes[b]
    p_ids, p_mask = left_pad(prefixes, pad_id, device)
    read_history = hidden_at is not None and hidden_at.history is not None
    inputs = dict(input_ids=p_ids, attention_mask=attention_mask_for(model, p_mask, p_ids.shape[1]),
                  position_ids=positions(p_mask), use_cache=True)
    if upto is not None:
        from transformers import DynamicCache

        cache = DynamicCache()  # filled in place by the layers that run
        prefix_states = forward_to_layer(model, upto, **inputs, past_key_values=cache)
    else:
        out = model(**inputs, logits_to_keep=1, output_hidden_states=read_history)
        cache, prefix_states = out.past_key_values, out.hidden_states[hidden_at.layer] if read_history else None
    history = None
    if read_history:  # the history lines lie in the shared prefix
        if bool((hidden_at.history >= torch.tensor(batch.prefix_len)[:, None]).any()):
            raise ValueError("a history line lies after the shared prefix: the data's prefix_len is wrong")
        shift = (p_ids.shape[1] - torch.tensor(batch.prefix_len))[:, None]
        history = gather_hidden(prefix_states, hidden_at.history + shift)
    cache.batch_repeat_interleave(2)  # rows: b0 original, b0 permuted, b1 original, ...
    suffixes = []
    for b in range(B):
        suffixes += [batch.input_ids[b][batch.prefix_len[b]:], batch.perm_input_ids[b][batch.prefix_len[b]:]]
    s_ids, s_mask = left_pad(suffixes, pad_id, device)
    prefix_mask = p_mask.repeat_interleave(2, dim=0)
    start = prefix_mask.sum(-1, keepdim=True)
    full_mask = torch.cat([prefix_mask, s_mask], dim=1)
    inputs = dict(input_ids=s_ids, attention_mask=attention_mask_for(model, full_mask, s_ids.shape[1]),
                  position_ids=positions(s_mask, start), past_key_values=cache, use_cache=True)
    if upto is not None:
        states, logits = forward_to_layer(model, upto, **inputs), [None, None]
    else:
        out = model(**inputs, logits_to_keep=tail_len, output_hidden_states=hidden_at is not None)
        states = out.hidden_states[hidden_at.layer] if hidden_at is not None else None
        logits = [out.logits[0::2], out.logits[1::2]]
    hidden = [None, None]
    if hidden_at is not None:  # candidate lines lie in the suffixes: suffix coordinates, left-padded
        cand = torch.stack(hidden_at.candidates, dim=1).flatten(0, 1)  # rows as in the suffix batch
        prefix = torch.tensor(batch.prefix_len).repeat_interleave(2)
        if bool((cand < prefix[:, None]).any()):
            raise ValueError("a candidate line lies in the shared prefix: the data's prefix_len is wrong")
        shift = s_ids.shape[1] - torch.tensor([len(s) for s in suffixes]) - prefix
        h = gather_hidden(states, cand + shift[:, None])
        hidden = [h[0::2], h[1::2]]
    return logits, hidden, history


def step_loss(cfg: LossConfig, seed: int, epoch: int, step: int) -> LossConfig:
    """The loss settings of one micro-step. With loss.permutation_rate p < 1 a seeded draw per
    (seed, epoch, step) runs the permuted pass on a share p of the micro-steps with weight beta / p
    (the same gradient in expectation) and skips it (beta 0) on the rest."""
    if cfg.beta == 0 or cfg.permutation_rate >= 1:
        return cfg
    draw = random.Random(f"{seed}/{epoch}/{step}").random()
    return dataclasses.replace(cfg, beta=cfg.beta / cfg.permutation_rate if draw < cfg.permutation_rate else 0.0)


def compute_losses(model, batch: TrainBatch, identifier_ids: torch.Tensor, cfg: LossConfig,
                   pad_id: int, header_len: int, shared_prefix: bool = True, scorer=None, lower=None) -> LossTerms:
    """The objective `cfg.objective` names; `scorer` (model/score_head.CandidateScorer, its head
    registered on `model`) is needed by the score objective; `lower`: see `forward_tails`."""
    if cfg.beta > 0 and batch.perm_input_ids is None:
        raise ValueError("loss.beta > 0 needs a batch collated with a permutation (perm_index)")
    if cfg.objective == "score":
        return score_losses(model, batch, cfg, pad_id, header_len, shared_prefix, scorer)
    tails = forward_tails(model, batch, pad_id, header_len, shared_prefix, lower=lower)
    orig = tails[0]
    ident = identifier_ids.to(orig.logits.device)
    sft = sft_loss(orig.logits, orig.labels_mask, orig.ids)
    rank = perm = None
    if cfg.alpha > 0 or cfg.beta > 0:
        y = slot_probabilities(orig.logits, orig.slots, ident, cfg.slot_softmax)
    if cfg.alpha > 0:
        rank = rank_loss_from_slots(y, batch.ratings.to(y.device), cfg.gamma, cfg.sigma)
    if cfg.beta > 0:
        permuted = tails[1]
        q_perm = map_to_items(slot_probabilities(permuted.logits, permuted.slots, ident, cfg.slot_softmax),
                              batch.perm_order.to(y.device))
        if cfg.permutation_form == "distribution":
            perm = permutation_loss(y, q_perm, detach_reference=cfg.detach_reference)
        else:
            gold = batch.gold.to(y.device).unsqueeze(-1)
            perm = literal_permutation_loss(y.gather(2, gold).squeeze(-1), q_perm.gather(2, gold).squeeze(-1),
                                            detach_reference=cfg.detach_reference)
    return alro_loss(sft, rank, perm, cfg.alpha, cfg.beta)


def score_losses(model, batch: TrainBatch, cfg: LossConfig, pad_id: int, header_len: int, shared_prefix: bool,
                 scorer) -> LossTerms:
    """total = alpha * score_loss(head scores) + beta * score consistency + sft_weight * sft (at
    sft_weight 0 the SFT term is not computed and reads 0, as on the frozen path).

    The head reads the original and the permuted prompt in the same pass as the SFT tail; the
    permuted pass's scores are mapped back to original item order before the consistency term."""
    if scorer is None:
        raise ValueError("loss.objective=score needs the score head (model.head.kind linear or mlp)")
    c = batch.ratings.shape[1]
    groups = [batch.input_ids] + ([batch.perm_input_ids] if batch.perm_input_ids is not None else [])
    cand = [torch.tensor([scorer.positions(s, c) for s in group]) for group in groups]
    lines = scorer.history(batch.input_ids, c)  # the same lines in the permuted prompt
    with_sft = cfg.sft_weight > 0  # else no logits, and the forward stops at the head's layer
    tails = forward_tails(model, batch, pad_id, header_len, shared_prefix,
                          hidden_at=HiddenAt(scorer.layer, cand, None if lines is None else lines.positions),
                          logits=with_sft)
    orig = tails[0]
    scores = scorer.head(orig.hidden, orig.history, lines)
    sft = sft_loss(orig.logits, orig.labels_mask, orig.ids) if with_sft else None
    rank = score_rank_loss(cfg.score_loss, scores, batch.ratings.to(scores.device), batch.gold.to(scores.device),
                           cfg.sigma)
    perm = None
    if cfg.beta > 0:
        permuted = map_scores_to_items(scorer.head(tails[1].hidden, orig.history, lines),
                                       batch.perm_order.to(scores.device))
        perm = score_consistency_loss(scores, permuted, detach_reference=cfg.detach_reference)
    return alro_loss(sft, rank, perm, cfg.alpha, cfg.beta, sft_weight=cfg.sft_weight)
