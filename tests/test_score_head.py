"""The score head on a real (tiny) model: candidate positions, the score objective, learning on a
planted batch, the checkpoint round trip, mode `score`, and one Ray Train run with a head."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from alro_ray import cli
from alro_ray.config import ConfigError, HeadConfig, load_config
from alro_ray.data.dataset import ranking_stats
from alro_ray.data.prompts import LETTERS, Item, render_prefix, render_suffix
from alro_ray.data.tokenize import RankTokenizer
from alro_ray.errors import NonFiniteError
from alro_ray.model.checkpoint import load_ranker, save_ranker
from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
from alro_ray.model.score_head import ScoreHead, attach_head, build_head, head_of, scorer_of
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
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("configs/tiny.yaml", overrides)


def test_freeze_lm_trains_the_head_only():
    model = _model(_cfg("model.freeze_lm=true"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("score_head.") for n in trainable)


# ---------------------------------------------------------------------------------------------
# The score objective on planted lists: relevance is set by one genre.


def _planted_rows(tok, n, seed, permutations=0):
    """n lists of C candidates; a Horror candidate is rated 5, every other one 1 or 2."""
    rng = random.Random(seed)
    rows = {k: [] for k in ("input_ids", "slot_positions", "candidate_ratings", "gold_order", "prefix_len",
                            "perm_orders", "perm_input_ids", "perm_slot_positions")}
    for _ in range(n):
        genres = [rng.choice(GENRES) for _ in range(C)]
        genres[rng.randrange(C)] = "Horror"
        items = [Item(f"{rng.choice(['Red', 'Blue', 'Old'])} {rng.choice(['Road', 'Sea', 'Town'])}", g) for g in genres]
        ratings = [5.0 if g == "Horror" else float(rng.choice([1, 2])) for g in genres]
        gold = sorted(range(C), key=lambda j: (-ratings[j], j))
        prefix = render_prefix([(Item("Some Film", rng.choice(GENRES)), 3.0)], "movies", "genres")
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


def test_shared_prefix_pass_equals_two_full_passes_for_the_score_objective(tok):
    cfg = _cfg("model.head.kind=mlp", "loss.beta=0.5", "loss.sft_weight=0.3")
    model = _model(cfg)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    rows = _planted_rows(tok, 3, seed=1, permutations=1)
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
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-3), n


def _ndcg(model, tok, rows) -> float:
    prompts = [ids[:slots[0]] for ids, slots in zip(rows["input_ids"], rows["slot_positions"])]
    orders, _ = rank_batch(model, prompts, tok.identifier_ids, "score", tok.tokenizer.pad_token_id,
                           scorer=scorer_of(model, tok))
    return sum(ndcg_at_k([r[j] for j in o], C) for o, r in zip(orders, rows["candidate_ratings"])) / len(orders)


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
    assert info["head"] == {"kind": "mlp", "position": "identifier", "layer": -2, "hidden": 256,
                            "hidden_size": 64, "weights": "head.safetensors"}
    assert set(load_file(tmp_path / "head.safetensors")) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    ranker = load_ranker(tmp_path)
    orders, got = ranker.rank(prompts, "score")
    assert orders == want_orders
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)


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


def test_ray_train_trains_checkpoints_and_evaluates_the_head(ray_local, tmp_path, capsys):
    from alro_ray.train.trainer import run_training

    cfg = _cfg("train.max_steps_per_epoch=3", "train.eval_users=6", "loss.beta=0.1")
    outcome = run_training(cfg, tmp_path / "run")
    assert [h["epoch"] for h in outcome.history] == [1, 2]
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


def test_serve_ranks_in_mode_score_with_a_head_and_refuses_it_without(tok, tmp_path):
    """The ranker deployment's batch path in-process (no Serve started): one base model, an adapter
    with a head and one without, every mode in one batch."""
    from alro_ray.serve.deployments import RankerDeployment
    from alro_ray.serve.registry import load_registry
    from alro_ray.serve.schemas import make_schemas
    from alro_ray.serve.settings import ServeSettings

    cfg = _cfg()
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
        return {"adapter": adapter, "mode": mode, "history": [["Old", "Noir", 4.0]],
                "candidates": [[f"T{j}", "Noir"] for j in range(3)]}

    head, no_head, one_pass = deployment._run_batch([request("head", "score"), request("plain", "score"),
                                                     request("plain", "one-pass")])
    ranker = load_ranker(tmp_path / "head")
    ids = ranker.prompt_ids([(Item("Old", "Noir"), 4.0)], [Item(f"T{j}", "Noir") for j in range(3)])
    orders, scores = ranker.rank([ids], "score", 3)
    assert head["order"] == orders[0] and head["scores"] == pytest.approx(scores[0], abs=1e-5)
    assert no_head["status"] == 422 and "no score head" in no_head["error"]
    assert sorted(one_pass["order"]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Learning on per-user tastes (issue 11, must-show 6).

MARGIN = 0.03  # NDCG@10 over item-mean on the 60 test lists of 4 candidates (about 1.5 standard errors)


@pytest.mark.slow
def test_score_head_beats_item_mean_on_per_user_tastes(ray_local, tmp_path):
    """Not yet seen passing. A 30-step, 1-epoch cut (2026-11-22): score 0.869, item-mean 0.857,
    random 0.857 (NDCG@10, 60 lists); a whole first epoch (2026-11-23): valid 0.848. Why (frozen
    probes, docs/method.md "What the score head cannot see"): a head on the candidate's own state
    cannot see the user's taste; matching it against the rated history lines' states can (0.929
    frozen). This test waits for that user-conditioned head."""
    from alro_ray.rank.batch_eval import run_evaluation
    from alro_ray.train.trainer import run_training

    outcome = run_training(load_config("configs/planted_score.yaml"), tmp_path)
    metrics = run_evaluation(outcome.final_dir, tmp_path / "eval", data_dir=outcome.data_dir,
                             modes=["score"], baselines=("random", "item-mean"))
    ranker, item_mean = metrics["modes"]["score"], metrics["baselines"]["item-mean"]
    print(outcome.history, ranker, item_mean, metrics["baselines"]["random"])
    assert ranker["lists"] >= 50
    assert ranker["ndcg@10"] >= item_mean["ndcg@10"] + MARGIN
