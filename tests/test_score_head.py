"""The score head on a real (tiny) model: candidate and history positions, the user match, the
score objective, learning on a planted batch, the checkpoint round trip, mode `score`, Ray Train
runs with a head (and with a frozen LM's cached states)."""

import dataclasses
import json
import os
import random
import types

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import with_tiny_data
from alro_ray import cli
from alro_ray.config import ConfigError, HeadConfig, load_config
from alro_ray.data.dataset import ranking_stats
from alro_ray.data.prompts import LETTERS, Item, render_prefix, render_suffix
from alro_ray.data.tokenize import RankTokenizer
from alro_ray.errors import NonFiniteError
from alro_ray.rank.ranker import load_ranker, save_ranker
from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
from alro_ray.model.score_head import HistoryLines, ScoreHead, attach_head, build_head, head_of, scorer_of
from alro_ray.rank.metrics import ndcg_at_k
from alro_ray.rank.ranking import rank_batch
from alro_ray.train.objective import collate, compute_losses

C = 5
SCORE = ["model.head.kind=linear", "loss.objective=score", "train.eval_mode=score", "loss.alpha=1.0"]
GENRES = ("Horror", "Comedy", "Western", "Musical", "Noir")


def _cfg(*overrides):
    return load_config("configs/tiny.yaml", ["model.lora.dropout=0.0", *SCORE, *overrides])


@pytest.fixture(scope="module")
def tok():
    return RankTokenizer(load_tokenizer("tiny-random"), C)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    attach_head(model, cfg.model)
    return model


def _prompt(tok, history, candidates):
    return tok.prompt_ids(render_prefix(history, "movies", "genres"), render_suffix(candidates, "genres"))


# ---------------------------------------------------------------------------------------------
# Where the head reads.


def test_candidate_positions_on_a_planted_prompt(tok):
    candidates = [Item("Aardvark Days", "Horror"), Item("A Bug (A) Life", ""), Item("Cold", "Noir|War"),
                  Item("Dune", "Sci-Fi"), Item("Eel", "Comedy")]
    ids, prefix_len = _prompt(tok, [(Item("Old Film", "Noir"), 4.0)], candidates)
    lines = render_suffix(candidates, "genres").split("\n")[:C]
    ends = tok.candidate_positions(ids, C)
    # Each candidate line is exactly the tokens after the previous line's end, up to its own.
    for j, (start, end) in enumerate(zip([prefix_len - 1] + ends[:-1], ends)):
        assert tok.tokenizer.decode(ids[start + 1:end + 1]) == lines[j] + "\n"
    letters = tok.candidate_positions(ids, C, "identifier")
    assert [tok.tokenizer.decode([ids[p]]) for p in letters] == list(LETTERS[:C])
    assert all(e > i for e, i in zip(ends, letters))
    # Read from the end: the gold response after the prompt, or demos before it, change nothing.
    full = tok.encode(render_prefix([(Item("Old Film", "Noir"), 4.0)], "movies", "genres"),
                      render_suffix(candidates, "genres"), [2, 0, 1, 4, 3]).input_ids
    assert tok.candidate_positions(full, C) == ends
    demos = tok.tokenizer.encode("### Instruction:\nrank\n(A) x\n\n", add_special_tokens=False)
    assert tok.candidate_positions(demos + ids, C) == [e + len(demos) for e in ends]
    with pytest.raises(ValueError, match="fewer than"):
        tok.candidate_positions(tok.tokenizer.encode("no lines here", add_special_tokens=False), C)


def test_history_lines_on_a_planted_prompt(tok):
    history = [(Item("Old Film (1990)", "Noir"), 4.0), (Item("Says rating: 5", "War|Noir"), None),
               (Item("Zed", "Comedy"), 2.5)]
    candidates = [Item(f"T{j}", "Noir") for j in range(C)]
    ids, prefix_len = _prompt(tok, history, candidates)
    lines = tok.history_lines(ids, C)
    # The rating each line shows (none on the second: its title's "rating: 5" is item text).
    assert [r for _, r in lines] == [4.0, None, 2.5]
    ends = [end for end, _ in lines]
    assert all("\n" in tok.tokenizer.decode([ids[e]]) for e in ends) and ends == sorted(ends)
    assert ends[-1] < prefix_len - 1  # the "[Candidate Items]:" line follows
    assert tok.tokenizer.decode(ids[ends[0] + 1:ends[1] + 1]) == "title: Says rating - 5 genres: War|Noir\n"
    assert tok.history_lines(ids + [5, 6, 7], C) == lines  # a response after the prompt changes nothing
    assert tok.history_lines(_prompt(tok, [], candidates)[0], C) == []
    with pytest.raises(ValueError, match="User Interaction History"):
        tok.history_lines(ids[prefix_len - 4:], C)


def test_hidden_states_at_a_layer_stop_early_and_equal_the_full_forward():
    from alro_ray.model.padding import left_pad, positions
    from alro_ray.model.hidden import hidden_states_at

    model = add_lora(load_base_model(_cfg().model), _cfg().model).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [3, 4, 5]], 0, "cpu")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                     output_hidden_states=True).hidden_states
        assert len(full) == 3
        for layer in range(-3, 3):  # the embeddings, decoder layer 0's output, the last (normed) layer
            assert torch.equal(hidden_states_at(model, layer, ids, mask), full[layer]), layer
    # The layers above the one asked for do not run.
    calls = []
    handle = model.get_base_model().get_decoder().layers[1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        hidden_states_at(model, 1, ids, mask)
    handle.remove()
    assert calls == []


def test_user_match_by_hand():
    """score = w.LN(c) + b + (P LN(c)).(Q u), u = [mean LN(h), mean (r - mean r) LN(h)] over the
    lines shown; a line without rating weighs 0 in the second half, padding in neither."""
    head = ScoreHead(2, HeadConfig(kind="linear", user="rated_history", user_rank=1))
    with torch.no_grad():
        head.net.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.net.bias.fill_(0.5)
        head.match_candidate.weight.copy_(torch.tensor([[1.0, 0.0]]))  # P: first coordinate
        head.match_user.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0]]))  # Q: weighted half, first coordinate
    # LayerNorm of a 2-vector (a, b) is (+1, -1) if a > b else (-1, +1) (up to eps).
    cand = torch.tensor([[[3.0, 1.0], [0.0, 2.0]]])  # LN: (1, -1), (-1, 1)
    states = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [1.0, 0.0], [9.0, 9.0]]])  # LN: (1,-1), (-1,1), (1,-1), pad
    lines = HistoryLines(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[5.0, 1.0, float("nan"), 9.0]]),
                         torch.tensor([[True, True, True, False]]))
    # mean rating over rated lines 3; weights (2, -2, 0); weighted mean over 3 lines of LN(h)[0]:
    # (2*1 + -2*-1 + 0*1) / 3 = 4/3. Candidate 0: 1 + 0.5 + 1 * 4/3; candidate 1: -1 + 0.5 - 4/3.
    got = head(cand, states, lines)
    assert torch.allclose(got, torch.tensor([[1.5 + 4 / 3, -0.5 - 4 / 3]]), atol=1e-4)
    with pytest.raises(ValueError, match="history lines"):
        head(cand)
    assert head.user_vector(torch.zeros(1, 0, 2), HistoryLines.of([[]])).abs().sum() == 0  # no history: u = 0


def test_head_kinds_shapes_and_layer_check():
    h = torch.randn(3, C, 64)
    assert ScoreHead(64, HeadConfig(kind="linear")).forward(h).shape == (3, C)
    mlp = ScoreHead(64, HeadConfig(kind="mlp", hidden=16))
    assert mlp(h).shape == (3, C) and mlp.net[0].out_features == 16
    with pytest.raises(ConfigError, match="linear or mlp"):
        ScoreHead(64, HeadConfig(kind="none"))
    model = load_base_model(_cfg().model)  # 2 layers: hidden states -3..2
    assert build_head(model, HeadConfig(kind="linear", layer=-3)).cfg.layer == -3
    with pytest.raises(ConfigError, match="model.head.layer=3, but the model has 2 layers"):
        build_head(model, HeadConfig(kind="linear", layer=3))


def test_config_refuses_keys_that_do_not_go_together():
    for overrides, match in [
        (["loss.objective=score", "train.eval_mode=score"], "model.head.kind=none"),
        (["model.head.kind=linear"], "trained by loss.objective=score only"),
        (["model.head.kind=linear", "loss.objective=score"], "set train.eval_mode=score"),
        (["loss.sft_weight=0.5"], "loss.sft_weight applies to loss.objective=score"),
        ([*SCORE, "loss.alpha=0"], "needs loss.alpha > 0"),
        (["model.freeze_lm=true"], "needs loss.objective=score"),
        ([*SCORE, "model.freeze_lm=true", "loss.sft_weight=0.1"], "would train nothing"),
        (["model.head.user=rated_history"], "part of the score head"),
        ([*SCORE, "model.head.user_rank=0"], "user_rank must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("configs/tiny.yaml", overrides)


def test_freeze_lm_trains_the_head_only():
    model = _model(_cfg("model.freeze_lm=true"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("score_head.") for n in trainable)


def test_lora_layers_of_a_head_alone_sit_below_its_layer_and_get_its_gradient(tok):
    """With the head's loss alone (objective score, sft_weight 0) `model.lora.layers: k` adapts the k
    layers below the head's: on the model's top k a head on a lower layer reads none of them, and
    their adapters would get no gradient (the old placement, still the one for generative losses)."""
    cfg = _cfg("model.head.layer=-2", "model.lora.layers=1", "loss.beta=0")  # 2 layers: the head reads layer 0's output
    rows = _planted_rows(tok, 2, seed=0)

    def lora_grads(head_only):
        torch.manual_seed(0)
        model = add_lora(load_base_model(cfg.model), cfg.model, head_only)
        attach_head(model, cfg.model)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters an effect
                p.data.normal_(0, 0.05)
        _losses(model, tok, cfg, rows).total.backward()
        return {n.split(".layers.")[1].split(".")[0]: p.grad for n, p in model.named_parameters()
                if "lora_" in n}

    below = lora_grads(True)
    assert set(below) == {"0"} and all(g is not None and g.abs().sum() > 0 for g in below.values())
    top = lora_grads(False)
    assert set(top) == {"1"} and all(g is None or g.abs().sum() == 0 for g in top.values())
    two = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, layers=2))
    with pytest.raises(ConfigError, match="the score head on layer -2 reads only 1 of tiny-random's 2 decoder layers"):
        add_lora(load_base_model(two), two, head_only=True)


# ---------------------------------------------------------------------------------------------
# The score objective on planted lists: relevance is set by one genre.


def _planted_rows(tok, n, seed, permutations=0, history=1):
    """n lists of C candidates; a Horror candidate is rated 5, every other one 1 or 2. The first
    history line is rated 3; further ones (`history`) get random ratings."""
    rng = random.Random(seed)
    rows = {k: [] for k in ("input_ids", "slot_positions", "candidate_ratings", "gold_order", "prefix_len",
                            "perm_orders", "perm_input_ids", "perm_slot_positions")}
    for _ in range(n):
        genres = [rng.choice(GENRES) for _ in range(C)]
        genres[rng.randrange(C)] = "Horror"
        items = [Item(f"{rng.choice(['Red', 'Blue', 'Old'])} {rng.choice(['Road', 'Sea', 'Town'])}", g) for g in genres]
        ratings = [5.0 if g == "Horror" else float(rng.choice([1, 2])) for g in genres]
        gold = sorted(range(C), key=lambda j: (-ratings[j], j))
        shown = [(Item("Some Film", rng.choice(GENRES)), 3.0)] + [
            (Item(f"Film {k}", rng.choice(GENRES)), float(rng.randint(1, 5))) for k in range(history - 1)]
        prefix = render_prefix(shown, "movies", "genres")
        enc = tok.encode(prefix, render_suffix(items, "genres"), gold)
        perms = [rng.sample(range(C), C) for _ in range(permutations)]
        p_enc = [tok.encode(prefix, render_suffix([items[i] for i in p], "genres"),
                            [p.index(g) for g in gold]) for p in perms]
        for key, value in (("input_ids", enc.input_ids), ("slot_positions", enc.slot_positions),
                           ("candidate_ratings", ratings), ("gold_order", gold), ("prefix_len", enc.prefix_len),
                           ("perm_orders", perms), ("perm_input_ids", [e.input_ids for e in p_enc]),
                           ("perm_slot_positions", [e.slot_positions for e in p_enc])):
            rows[key].append(value)
    return rows


def _losses(model, tok, cfg, rows, perm_index=None, shared_prefix=True):
    batch = collate(rows, perm_index=perm_index)
    return compute_losses(model, batch, torch.tensor(tok.identifier_ids), cfg.loss, tok.tokenizer.pad_token_id,
                          len(tok.header_ids), shared_prefix=shared_prefix, scorer=scorer_of(model, tok))


@pytest.mark.parametrize("user", ["none", "rated_history"])
def test_shared_prefix_pass_equals_two_full_passes_for_the_score_objective(tok, user):
    cfg = _cfg("model.head.kind=mlp", "loss.beta=0.5", "loss.sft_weight=0.3", f"model.head.user={user}")
    model = _model(cfg)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    rows = _planted_rows(tok, 3, seed=1, permutations=1, history=3)
    results = []
    for shared in (True, False):
        model.zero_grad()
        terms = _losses(model, tok, cfg, rows, perm_index=0, shared_prefix=shared)
        terms.total.backward()
        results.append((terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    for name in ("total", "sft", "rank", "perm"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    assert float(a.perm.detach()) > 0 and float(a.rank.detach()) > 0
    assert float(a.total) == pytest.approx(float(a.rank + 0.5 * a.perm + 0.3 * a.sft), rel=1e-5)
    assert any(n.startswith("score_head.") for n in ga) and any("lora_A" in n for n in ga)
    assert (user != "none") == ("score_head.match_user.weight" in ga)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-3), n


@pytest.mark.parametrize("shared", [True, False])
def test_the_head_alone_stops_the_forward_at_its_layer_with_the_full_forwards_losses_and_gradients(tok, shared):
    """At sft_weight 0 no logits are needed, so the forward stops at the head's layer (the top layer
    of the tiny model never runs) and gives the head the losses and gradients of the full forward
    (taken here at an sft_weight too small to move them), with the user match and a permutation."""
    def run(sft_weight):
        cfg = _cfg("model.head.user=rated_history", "loss.beta=0.5", f"loss.sft_weight={sft_weight}",
                   "model.head.layer=-2")
        model = _model(cfg)
        for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        calls = []
        model.get_base_model().get_decoder().layers[1].register_forward_hook(lambda *a: calls.append(1))
        terms = _losses(model, tok, cfg, _planted_rows(tok, 3, seed=1, permutations=1, history=3),
                        perm_index=0, shared_prefix=shared)
        terms.total.backward()
        return terms, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    (a, ga, top_a), (b, gb, top_b) = run(0), run(1e-12)
    assert top_a == 0 and top_b > 0  # the layer above the head's ran only for the logits
    assert float(a.sft) == 0 and float(b.sft) > 0
    for name in ("rank", "perm"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    assert float(a.perm.detach()) > 0 and "score_head.match_user.weight" in ga
    assert any("layers.0." in n and "lora_A" in n for n in ga) and set(ga) < set(gb)
    assert all("layers.1." in n for n in set(gb) - set(ga))  # the SFT term's, the head's loss never reaches them
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4), n


def _ndcg(model, tok, rows) -> float:
    prompts = [ids[:slots[0]] for ids, slots in zip(rows["input_ids"], rows["slot_positions"])]
    orders, _ = rank_batch(model, prompts, tok.identifier_ids, "score", tok.tokenizer.pad_token_id,
                           scorer=scorer_of(model, tok))
    return sum(ndcg_at_k([r[j] for j in o], C) for o, r in zip(orders, rows["candidate_ratings"])) / len(orders)


def test_user_head_scores_the_same_in_training_and_ranking(tok):
    """The objective reads the states from the training rows (prompt and response, 4D masks); mode
    score from the prompts alone: the head must get the same inputs from both."""
    from alro_ray.train.frozen import CachedStates

    cfg = _cfg("model.head.user=rated_history", "loss.beta=0", "loss.score_loss=listnet", "model.head.layer=-2")
    model = _model(cfg).eval()
    rows = _planted_rows(tok, 4, seed=5, history=4)
    prompts = [ids[:slots[0]] for ids, slots in zip(rows["input_ids"], rows["slot_positions"])]
    _, ranked = rank_batch(model, prompts, tok.identifier_ids, "score", tok.tokenizer.pad_token_id,
                           scorer=scorer_of(model, tok))
    ranked = torch.tensor(ranked)
    # ListNet of the ranking scores, by hand, equals the objective's loss on the training rows.
    target = torch.softmax(torch.tensor(rows["candidate_ratings"]), -1)
    want = -(target * torch.log_softmax(ranked, -1)).sum(-1).mean()
    assert float(_losses(model, tok, cfg, rows).rank) == pytest.approx(float(want), rel=1e-4)
    records = [dict(zip(rows, values), user=f"u{i}") for i, values in enumerate(zip(*rows.values()))]
    cached = CachedStates.extract(model, scorer_of(model, tok), records, tok.tokenizer.pad_token_id, batch_size=3)
    assert torch.allclose(cached.scores(head_of(model)), ranked, atol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_cached_states_give_the_consistency_term_and_gradients_of_the_full_forward(tok, detach):
    """loss.beta > 0 on a frozen LM: the head's losses and gradients from the cached states of
    the original and the permuted prompts (frozen.read_permuted) equal the score objective's on
    the training rows (objective.score_losses, SFT weight 0)."""
    from alro_ray.train import frozen

    cfg = _cfg("model.head.user=rated_history", "loss.beta=0.7", "loss.alpha=1.3", "model.freeze_lm=true",
               "model.head.layer=-2", f"loss.detach_reference={str(detach).lower()}")
    model = _model(cfg).eval()
    head = head_of(model)
    rows = _planted_rows(tok, 4, seed=3, permutations=2, history=3)
    records = [dict(zip(rows, values), user=f"u{i}") for i, values in enumerate(zip(*rows.values()))]
    cached = frozen.read_states(model, tok, records, tok.tokenizer.pad_token_id, 0, lambda _: None, "train")
    frozen.read_permuted(model, tok, cached, 5, tok.tokenizer.pad_token_id, 0, lambda _: None, "train")
    assert len(cached.permuted) == 2  # both stored permutations (epoch e reads e mod 2)
    for k in (0, 1):
        head.zero_grad()
        full = _losses(model, tok, cfg, rows, perm_index=k)
        full.total.backward()
        want = {n: p.grad.clone() for n, p in head.named_parameters()}
        head.zero_grad()
        got = frozen.losses(head, cached.batch(range(4), perm_index=k), cfg.loss)
        got.total.backward()
        for name in ("total", "rank", "perm"):
            assert float(getattr(got, name).detach()) == pytest.approx(float(getattr(full, name).detach()), rel=1e-4,
                                                                         abs=1e-6), name
        assert float(got.perm) > 0
        for n, p in head.named_parameters():
            assert torch.allclose(p.grad, want[n], atol=1e-6, rtol=1e-3), n
    with pytest.raises(ValueError, match="data.permutations >= 1"):
        frozen.permuted_rows([dict(records[0], perm_orders=[])], 0)


def test_stored_scores_rank_as_the_lm_does_and_a_second_ranker_reads_the_first_ones_states(tok, tmp_path):
    """--reuse-states: mode score on stored states gives rank_batch's orders (scores within float
    noise); a ranker with another head on the same frozen LM reads the stored file (no new one)
    and gets its own head's scores; a ranker whose LM was trained is refused the store."""
    from alro_ray.evaluate.stored_states import StoredScores, store_for
    from alro_ray.model.score_head import CandidateScorer
    from alro_ray.rank.ranker import Ranker

    cfg = _cfg("model.head.user=rated_history", "loss.beta=0", "model.freeze_lm=true", "model.head.layer=-2",
               f"model.cache_dir={tmp_path}")
    rows = _planted_rows(tok, 5, seed=7, history=3)
    prompts = [ids[:slots[0]] for ids, slots in zip(rows["input_ids"], rows["slot_positions"])]

    def ranker(seed, config=cfg):
        model = _model(config, seed=seed).eval()
        info = types.SimpleNamespace(candidates=C)  # all Ranker.rank reads of ranker.json
        return Ranker(model, tok.tokenizer, tok, info, config, CandidateScorer(head_of(model), tok))

    first, second = ranker(0), ranker(1)  # another head (and LoRA A) on the same frozen weights
    with torch.no_grad():
        for p in second.scorer.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    store = store_for(first)
    assert store == tmp_path / "frozen-states"
    for r in (first, second):
        want_orders, want_scores = r.rank(prompts, "score")
        orders, scores = StoredScores(r, store).rank(prompts, C)
        assert orders == want_orders
        assert torch.allclose(torch.tensor(scores), torch.tensor(want_scores), atol=1e-5)
        assert len(list(store.glob("*.pt"))) == 5  # a file per prompt: the second ranker read the first one's
    # in other batches (Ray Data's vary from run to run): the same files, the same scores
    again = StoredScores(second, store).rank(prompts[3:], C)[1] + StoredScores(second, store).rank(prompts[:3], C)[1]
    assert len(list(store.glob("*.pt"))) == 5
    assert torch.equal(torch.tensor(again), torch.tensor(scores[3:] + scores[:3]))
    assert not torch.allclose(torch.tensor(StoredScores(first, store).rank(prompts, C)[1]),
                              torch.tensor(StoredScores(second, store).rank(prompts, C)[1]))
    assert store_for(ranker(0, _cfg("model.head.user=rated_history", "loss.beta=0"))) is None


def test_read_states_stores_them_and_reads_them_back_only_for_the_same_weights_and_prompts(tok, tmp_path, caplog):
    """train.reuse_frozen_states: a second read of the same prompts by the same weights loads the
    stored states (no forward), equal to the first; other prompts, another layer or changed weights
    read anew; a torn file is read again with a warning."""
    from alro_ray.train import frozen

    cfg = _cfg("model.head.user=rated_history", "loss.beta=0", "model.freeze_lm=true", "model.head.layer=-2")
    model = _model(cfg).eval()
    rows = _planted_rows(tok, 4, seed=5, history=3)
    records = [dict(zip(rows, values), user=f"u{i}") for i, values in enumerate(zip(*rows.values()))]
    said = []

    def read(rows, m=model):
        said.clear()
        return frozen.read_states(m, tok, rows, tok.tokenizer.pad_token_id, 0, said.append, "train", tmp_path)

    first = read(records)
    assert said and not any("read the train states" in s for s in said) and len(list(tmp_path.glob("*.pt"))) == 1
    os.utime(next(tmp_path.glob("*.pt")), (1e9, 1e9))
    again = read(records)
    assert next(tmp_path.glob("*.pt")).stat().st_mtime > 1e9 + 1  # read back: its time is its last use (alro cache)
    assert said == [f"read the train states of 4 prompts back from {next(tmp_path.glob('*.pt'))} (rank 0)"]
    assert all(torch.equal(a, b) for a, b in zip(first.candidates, again.candidates))
    assert all(torch.equal(a, b) for a, b in zip(first.history, again.history))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first.lines, again.lines))
    assert torch.equal(first.scores(head_of(model)), again.scores(head_of(model)))

    read(records[:3])  # other prompts
    other_seed = _model(cfg, seed=1).eval()  # another LoRA A and head: the same states, read back
    read(records, other_seed)
    assert said[0].startswith("read the train states")
    changed = _model(cfg).eval()
    with torch.no_grad():
        next(p for n, p in changed.named_parameters() if "lora_B" in n).add_(0.01)
    read(records, changed)
    deeper = _model(_cfg("model.head.user=rated_history", "loss.beta=0", "model.freeze_lm=true",
                         "model.head.layer=-1")).eval()
    read(records, deeper)
    assert len(list(tmp_path.glob("*.pt"))) == 4 and not any(s.startswith("read the") for s in said)

    stored = frozen.states_key(model, scorer_of(model, tok), records, tok.tokenizer.pad_token_id, frozen.READ_BATCH)
    (tmp_path / f"{stored}.pt").write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="alro_ray"):
        torn = read(records)
    assert "unusable" in caplog.text and not any(s.startswith("read the") for s in said)
    assert all(torch.equal(a, b) for a, b in zip(first.candidates, torn.candidates))
    assert read(records) and said[0].startswith("read the train states")  # rewritten whole


def test_a_second_reader_of_the_same_states_waits_for_the_first_ones_file(tok, tmp_path):
    """Two Tune trials reading the same states at once: the one that finds the lock taken waits
    and loads the other's file instead of running the LM over the prompts a second time."""
    import fcntl
    import shutil
    import threading

    from alro_ray.train import frozen

    cfg = _cfg("loss.beta=0", "model.freeze_lm=true", "model.head.layer=-2")
    model = _model(cfg).eval()
    rows = _planted_rows(tok, 4, seed=5, history=3)
    records = [dict(zip(rows, values), user=f"u{i}") for i, values in enumerate(zip(*rows.values()))]
    pad = tok.tokenizer.pad_token_id
    first = frozen.read_states(model, tok, records, pad, 0, lambda _: None, "train", tmp_path / "other")
    (made,) = (tmp_path / "other").glob("*.pt")
    store = tmp_path / "store"
    store.mkdir()
    said, got = [], []
    with open(store / f"{made.stem}.lock", "w") as lock:  # the first reader, still at work
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.append(
            frozen.read_states(model, tok, records, pad, 0, said.append, "train", store)))
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and said == [f"waiting for another process reading the same train states into "
                                              f"{store / made.name}"]
        shutil.copy(made, store / made.name)  # ... which then writes its file
    waiter.join(timeout=30)
    assert not waiter.is_alive() and said[1].startswith("read the train states of 4 prompts back")
    assert all(torch.equal(a, b) for a, b in zip(first.candidates, got[0].candidates))


# ListNet's pull is weaker here (its target, softmax of the ratings, is flat over the non-Horror
# items): it gets more steps and a lower bar.
@pytest.mark.parametrize("score_loss,steps,gain", [("lambda", 15, 0.15), ("plackett_luce", 15, 0.15),
                                                   ("listnet", 30, 0.05)])
def test_the_head_learns_a_planted_feature(tok, score_loss, steps, gain):
    cfg = _cfg(f"loss.score_loss={score_loss}", "loss.beta=0")
    model = _model(cfg)
    train, held_out = _planted_rows(tok, 8, seed=2), _planted_rows(tok, 16, seed=3)
    before = _ndcg(model, tok, held_out)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        terms = _losses(model, tok, cfg, train)
        terms.total.backward()
        optimizer.step()
        losses.append(float(terms.total.detach()))
    after = _ndcg(model, tok, held_out)
    print(score_loss, losses[0], losses[-1], before, after)
    assert min(losses[-5:]) < 0.8 * losses[0]
    assert after > before + gain


# ---------------------------------------------------------------------------------------------
# The checkpoint and mode `score`.


def _stats(tok):
    return ranking_stats(C, 1, tok.identifier_ids, "tiny-random", "movies")


def test_save_load_round_trip_gives_identical_scores(tok, tmp_path):
    cfg = _cfg("model.head.kind=mlp", "model.head.position=identifier", "model.head.layer=-2")
    model = _model(cfg).eval()
    with torch.no_grad():  # a head that is not its initialisation
        for p in head_of(model).parameters():
            p.add_(torch.randn_like(p) * 0.1)
    rows = _planted_rows(tok, 4, seed=4)
    prompts = [ids[:slots[0]] for ids, slots in zip(rows["input_ids"], rows["slot_positions"])]
    want_orders, want = rank_batch(model, prompts, tok.identifier_ids, "score", tok.tokenizer.pad_token_id,
                                   scorer=scorer_of(model, tok))
    save_ranker(tmp_path, model, tok.tokenizer, cfg, _stats(tok), None)
    info = json.loads((tmp_path / "ranker.json").read_text())
    assert info["format"] == "alro-ranker-v1"
    assert info["head"] == {"kind": "mlp", "position": "identifier", "layer": -2, "hidden": 256, "user": "none",
                            "user_rank": 32, "hidden_size": 64, "weights": "head.safetensors"}
    assert set(load_file(tmp_path / "head.safetensors")) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    ranker = load_ranker(tmp_path)
    orders, got = ranker.rank(prompts, "score")
    assert orders == want_orders
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)


def test_user_head_round_trip_and_older_checkpoints(tok, tmp_path):
    cfg = _cfg("model.head.user=rated_history", "model.head.user_rank=4")
    model = _model(cfg).eval()
    rows = _planted_rows(tok, 3, seed=6, history=3)
    prompts = [ids[:slots[0]] for ids, slots in zip(rows["input_ids"], rows["slot_positions"])]
    _, want = rank_batch(model, prompts, tok.identifier_ids, "score", tok.tokenizer.pad_token_id,
                         scorer=scorer_of(model, tok))
    save_ranker(tmp_path / "user", model, tok.tokenizer, cfg, _stats(tok), None)
    assert set(load_file(tmp_path / "user" / "head.safetensors")) == {
        "net.weight", "net.bias", "match_candidate.weight", "match_user.weight"}
    assert load_file(tmp_path / "user" / "head.safetensors")["match_user.weight"].shape == (4, 128)
    _, got = load_ranker(tmp_path / "user").rank(prompts, "score")
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)
    # A checkpoint written before the user match existed has no user keys: it loads without one.
    plain = _model(_cfg())
    save_ranker(tmp_path / "old", plain, tok.tokenizer, _cfg(), _stats(tok), None)
    info = json.loads((tmp_path / "old" / "ranker.json").read_text())
    del info["head"]["user"], info["head"]["user_rank"]
    (tmp_path / "old" / "ranker.json").write_text(json.dumps(info))
    assert not load_ranker(tmp_path / "old").scorer.head.reads_history


def test_a_ranker_without_head_loads_and_refuses_mode_score(tok, tmp_path):
    cfg = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    save_ranker(tmp_path, add_lora(load_base_model(cfg.model), cfg.model), tok.tokenizer, cfg, _stats(tok), None)
    assert "head" not in json.loads((tmp_path / "ranker.json").read_text())
    ranker = load_ranker(tmp_path)
    assert ranker.scorer is None
    prompts = [_prompt(tok, [(Item("A", "Noir"), 3.0)], [Item(f"T{j}", "Noir") for j in range(C)])[0]]
    assert sorted(ranker.rank(prompts, "one-pass")[0][0]) == list(range(C))
    with pytest.raises(ValueError, match="mode 'score' needs a ranker trained with a score head"):
        ranker.rank(prompts, "score")


def test_mode_score_refuses_nonfinite_scores(tok):
    model = _model(_cfg()).eval()
    with torch.no_grad():
        head_of(model).net.weight[0, 0] = float("nan")
    prompts = [_prompt(tok, [(Item("A", "Noir"), 3.0)], [Item(f"T{j}", "Noir") for j in range(C)])[0]]
    with pytest.raises(NonFiniteError, match="score ranking"):
        rank_batch(model, prompts, tok.identifier_ids, "score", tok.tokenizer.pad_token_id,
                   scorer=scorer_of(model, tok))


# ---------------------------------------------------------------------------------------------
# Ray Train (2 workers, DeepSpeed ZeRO-2) with a head, then `alro evaluate --modes score`.


@pytest.mark.slow  # default-run time (issue 26): the LoRA + head path; the frozen-head run below covers Ray Train + head
def test_ray_train_trains_checkpoints_and_evaluates_the_head(ray_local, tmp_path, capsys):
    from alro_ray.train.trainer import run_training

    # The head on layer 0's output with LoRA on that layer: the engine's forward stops there.
    cfg = _cfg("train.max_steps_per_epoch=3", "train.eval_users=6", "loss.beta=0.1", "model.head.layer=-2",
               "model.lora.layers=1")
    outcome = run_training(cfg, tmp_path / "run")
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    adapter = load_file(outcome.final_dir / "adapter" / "adapter_model.safetensors")
    moved = [k for k, v in adapter.items() if "lora_B" in k and v.abs().sum() > 0]  # B starts at zero
    assert moved and all(".layers.0." in k for k in adapter)
    assert all(h["train_rank"] > 0 and h["train_perm"] > 0 and "valid_ndcg@10" in h for h in outcome.history)
    # The head changed between the two epochs' checkpoints: the optimizer steps it under ZeRO-2.
    epochs = sorted((tmp_path / "run" / "ray" / cfg.train.run_name).glob("epoch_*"))
    heads = [load_file(d / "ranker" / "head.safetensors") for d in epochs]
    assert len(heads) == 2 and not torch.equal(heads[0]["net.weight"], heads[1]["net.weight"])
    # DeepSpeed's own checkpoint holds the head too, so a resumed run continues from it.
    states = torch.load(next((epochs[-1] / "ds").glob("*model_states.pt")), map_location="cpu", weights_only=False)
    assert {"score_head.net.weight", "score_head.net.bias"} <= set(states["module"])
    assert torch.equal(load_file(outcome.final_dir / "head.safetensors")["net.weight"], heads[1]["net.weight"])

    assert cli.main(["evaluate", "--checkpoint", str(outcome.final_dir), "--out", str(tmp_path / "eval"), "--modes", "score",
                     "--baselines", "random"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["modes"]["score"]["lists"] > 0 and 0 < metrics["modes"]["score"]["ndcg@10"] <= 1


def test_frozen_lm_trains_the_head_on_cached_states(ray_local, tiny_data, tmp_path):
    """model.freeze_lm through Ray Train: the workers read the frozen LM's states once (with
    loss.beta > 0 those of the permuted prompts too), the head steps on them each epoch, and the validation on cached states equals ranking the valid split
    with the saved head (mode score, a forward per prompt). train.keep: best keeps the epoch with
    the best validation (ties: the earliest). With train.ema_decay each epoch's ranker holds the
    weights, and the validation figure is the average's. (A second run repeating it from the stored
    states: the slow test below.)"""
    import pyarrow.parquet as pq

    from alro_ray.model.loading import cache_root
    from alro_ray.rank.evaluation import prompt_ids
    from alro_ray.train.averaging import AVERAGE_FILE
    from alro_ray.train.checkpoints import DS_TAG
    from alro_ray.train.trainer import run_training

    cfg = _cfg(*FROZEN)
    outcome = run_training(cfg, with_tiny_data(tiny_data, tmp_path))
    store = cache_root(cfg.model.cache_dir) / "frozen-states"
    # train, valid and the train split's 2 permutations (2 epochs: permutations 0 and 1) of each of the 2 workers
    assert len(list(store.glob("*.pt"))) >= 8
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    assert all(h["train_rank"] > 0 and h["train_perm"] > 0 and h["train_sft"] == 0 and h["tokens_per_s"] == 0
               for h in outcome.history)
    epochs = [tmp_path / "ray" / cfg.train.run_name / f"epoch_00{e}" for e in (1, 2)]
    heads = [load_file(d / "ranker" / "head.safetensors") for d in epochs]
    assert not torch.allclose(heads[0]["match_user.weight"], heads[1]["match_user.weight"])
    averages = [torch.load(d / AVERAGE_FILE, weights_only=True) for d in epochs]
    assert averages[0]["steps"] > 1 and averages[1]["steps"] == 2 * averages[0]["steps"]
    trained = torch.load(epochs[1] / DS_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    averaged = [s / (1 - 0.9 ** averages[1]["steps"]) for s in averages[1]["shadow"]]
    for name, tensor in heads[1].items():
        assert any(a.shape == tensor.shape and torch.allclose(a, tensor) for a in averaged), name
        [raw] = [v for k, v in trained.items() if k.endswith(name)]
        if name != "net.bias":  # rank losses are blind to a shift of every score: it barely moves
            assert not torch.allclose(raw.float(), tensor, atol=1e-4), name  # the trained weights differ
    valid = [h["valid_ndcg@10"] for h in outcome.history]
    best = valid.index(max(valid))
    final = load_file(outcome.final_dir / "head.safetensors")
    assert all(torch.equal(final[k], heads[best][k]) for k in final)
    assert len(json.loads((outcome.final_dir / "history.json").read_text())) == best + 1  # that epoch's ranker
    assert outcome.history == json.loads((tmp_path / "history.json").read_text())  # the whole run's
    rows = pq.read_table(outcome.data_dir / "valid").to_pylist()  # every valid row: train.eval_users is unset
    ranker = load_ranker(outcome.final_dir)
    orders, _ = ranker.rank([prompt_ids(r) for r in rows], "score")
    ndcg = sum(ndcg_at_k([r["candidate_ratings"][j] for j in o], 10) for r, o in zip(rows, orders)) / len(rows)
    assert max(valid) == pytest.approx(ndcg, abs=1e-6)


FROZEN = ("loss.beta=0.5", "model.freeze_lm=true", "model.head.user=rated_history", "train.micro_batch=8",
          "train.grad_accum=1", "train.epochs=2", "train.lr=0.01", "train.keep=best", "train.ema_decay=0.9")


@pytest.mark.slow  # two more Ray Train runs (issue 26 moved the rerun out of the default run)
def test_a_second_frozen_run_reads_the_stored_states_and_repeats(ray_local, tmp_path):
    """The same frozen-head config twice: the second run repeats the first exactly (each worker's
    rows are a fixed share, not Ray Data's split), reading the states the first stored back from the
    model cache (train.reuse_frozen_states)."""
    from alro_ray.model.loading import cache_root
    from alro_ray.train.trainer import run_training

    cfg = _cfg(*FROZEN)
    first = run_training(cfg, tmp_path / "first")
    store = cache_root(cfg.model.cache_dir) / "frozen-states"
    stored = {f: f.stat().st_ino for f in store.glob("*.pt")}
    again = run_training(cfg, tmp_path / "again")
    # read, not rewritten (a rewrite renames a new file into place; a read back only touches its time)
    assert {f: f.stat().st_ino for f in store.glob("*.pt")} == stored
    same = ("train_loss", "train_rank", "valid_ndcg@10")
    assert [[h[k] for k in same] for h in again.history] == [[h[k] for k in same] for h in first.history]
    a, b = load_file(first.final_dir / "head.safetensors"), load_file(again.final_dir / "head.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # alro evaluate --reuse-states: the first evaluation stores a file per ranked prompt (each test
    # list and its 2 reorders), the second ranker reads them back and writes none; both rank as
    # the LM does.
    def evaluate(final, out, *extra):
        assert cli.main(["evaluate", "--checkpoint", str(final), "--out", str(tmp_path / out), "--modes", "score",
                         "--baselines", "", "--reorders", "2", *extra]) == 0
        return json.loads((tmp_path / out / "metrics.json").read_text())["modes"]["score"]

    plain = evaluate(first.final_dir, "eval-plain")
    before = set(store.glob("*.pt"))
    reused = evaluate(first.final_dir, "eval-reuse", "--reuse-states")
    new = set(store.glob("*.pt")) - before
    assert len(new) == 3 * len(pd.read_parquet(tmp_path / "eval-reuse" / "predictions.parquet"))
    # the same rankings; the mean has differed in its last bit under load (seen once, 2026-12-05)
    assert evaluate(again.final_dir, "eval-again", "--reuse-states")["ndcg@10"] == pytest.approx(reused["ndcg@10"],
                                                                                                abs=1e-12)
    assert set(store.glob("*.pt")) - before == new
    assert reused["ndcg@10"] == pytest.approx(plain["ndcg@10"], abs=1e-9)
    assert reused["stability_tau"] == pytest.approx(plain["stability_tau"], abs=1e-9)


@pytest.mark.slow
def test_frozen_lm_cached_states_train_the_head_as_recomputing_them_does(ray_local, tmp_path):
    """model.freeze_lm: the head fitted on states cached once per worker (train/frozen.py) ends as
    the head fitted on states recomputed every step. One micro-batch per worker per epoch, so the
    step's gradient (a mean over the shard, averaged over two equal shards) is the same whatever
    order or split the two paths read the rows in."""
    from alro_ray.train.trainer import run_training

    runs = {}
    for cache in ("true", "false"):
        cfg = _cfg("loss.beta=0", "model.freeze_lm=true", "model.head.user=rated_history", "train.micro_batch=64",
                   "train.grad_accum=1", "train.bucket=1", "train.epochs=2", "train.lr=0.01", "train.eval_users=12",
                   f"train.cache_frozen_states={cache}")
        runs[cache] = run_training(cfg, tmp_path / cache)
    cached, recomputed = runs["true"], runs["false"]
    assert [h["valid_ndcg@10"] for h in cached.history] == pytest.approx(
        [h["valid_ndcg@10"] for h in recomputed.history], abs=1e-6)
    assert [h["train_samples"] for h in cached.history] == [h["train_samples"] for h in recomputed.history]
    a, b = (load_file(r.final_dir / "head.safetensors") for r in (cached, recomputed))
    earlier = load_file(tmp_path / "true" / "ray" / cfg.train.run_name / "epoch_001" / "ranker" / "head.safetensors")
    for name in a:
        if name == "net.bias":  # rank losses are blind to a shift of every score: its gradient is noise
            continue
        assert not torch.allclose(a[name], earlier[name]), name  # the last epoch stepped it
        # a fifth of one epoch's step (lr 0.01 under Adam: ~0.005); a component whose gradient is
        # near zero takes Adam's sign of float noise
        assert torch.allclose(a[name], b[name], atol=1e-3), name


def test_serve_ranks_in_mode_score_with_a_head_and_refuses_it_without(tok, tmp_path):
    """The ranker deployment's batch path in-process (no Serve started): one base model, an adapter
    with a head and one without, every mode in one batch."""
    from alro_ray.serve.contract import RankJob
    from alro_ray.serve.deployments import RankerDeployment
    from alro_ray.serve.registry import load_registry
    from alro_ray.serve.schemas import make_schemas
    from alro_ray.serve.settings import ServeSettings

    cfg = _cfg("model.head.user=rated_history")  # the user match reads the request's history ratings
    save_ranker(tmp_path / "head", _model(cfg), tok.tokenizer, cfg, _stats(tok), None)
    plain = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    save_ranker(tmp_path / "plain", add_lora(load_base_model(plain.model), plain.model), tok.tokenizer, plain,
                _stats(tok), None)
    settings = ServeSettings.from_dict({"adapters": {"head": str(tmp_path / "head"), "plain": str(tmp_path / "plain")},
                                        "torch_threads": 1, "default_mode": "score"})
    assert make_schemas(settings, C)["RankRequest"](history=[{"title": "Old", "rating": 4}], mode="score",
                                                     candidates=[{"id": "a", "title": "T"}, {"id": "b", "title": "U"}])
    deployment = RankerDeployment.func_or_class(settings, load_registry(settings.adapters))

    def request(adapter, mode):
        return RankJob(adapter, mode, [(Item("Old", "Noir"), 4.0), (Item("New", "War"), 1.0)],
                       [Item(f"T{j}", "Noir") for j in range(3)], [f"t{j}" for j in range(3)])

    head, no_head, one_pass = deployment._run_batch([request("head", "score"), request("plain", "score"),
                                                     request("plain", "one-pass")])
    ranker = load_ranker(tmp_path / "head")
    assert ranker.scorer.head.reads_history
    ids = ranker.prompt_ids([(Item("Old", "Noir"), 4.0), (Item("New", "War"), 1.0)],
                            [Item(f"T{j}", "Noir") for j in range(3)])
    orders, scores = ranker.rank([ids], "score", 3)
    assert head.order == orders[0] and head.scores == pytest.approx(scores[0], abs=1e-5)
    assert no_head.status == 422 and "no score head" in no_head.error
    assert sorted(one_pass.order) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Learning on per-user tastes (issue 11, must-show 6).

MARGIN = 0.03  # NDCG@10 over item-mean on the 60 test lists of 4 candidates (about 1.5 standard errors)


@pytest.mark.slow
def test_score_head_beats_item_mean_on_per_user_tastes(ray_local, tmp_path):
    """configs/planted_score.yaml's recipe: the frozen LM, the score head with the user match,
    fitted on cached states. 2026-11-23: 0.925 against item-mean 0.857 and random 0.857 (+0.068
    [+0.034, +0.102]), 6.6 min. Its candidate-only forerunner never passed (valid 0.848 after a
    LoRA epoch; docs/method.md, "What the score head cannot see")."""
    from alro_ray.evaluate.batch_eval import EvalSettings, run_evaluation
    from alro_ray.train.trainer import run_training

    outcome = run_training(load_config("configs/planted_score.yaml"), tmp_path)
    metrics = run_evaluation(outcome.final_dir, tmp_path / "eval", outcome.data_dir,
                             EvalSettings(modes=["score"], baselines=("random", "item-mean")))
    ranker, item_mean = metrics["modes"]["score"], metrics["baselines"]["item-mean"]
    print(outcome.history[-1], ranker, item_mean, metrics["baselines"]["random"])
    assert ranker["lists"] >= 50
    assert ranker["ndcg@10"] >= item_mean["ndcg@10"] + MARGIN

