"""Ranking modes and the batch evaluation job on a real local Ray with a tiny ranker."""

import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import random_ranker
import torch

from alro_ray.evaluate.batch_eval import EvalSettings, parse_modes, run_evaluation
from alro_ray.rank.ranker import load_ranker, save_ranker
from alro_ray.config import load_config
from alro_ray.errors import AlroError
from alro_ray.rank.evaluation import prompt_ids
from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
from alro_ray.data.dataset import load_renderer, read_split, read_split_table, read_stats
from alro_ray.evaluate.stability import reorders_for
from alro_ray.rank.metrics import item_ranks
from alro_ray.rank.ranking import bootstrap_orders, rank_batch

TINY = ["data.synthetic.users=40", "data.permutations=0"]


@pytest.fixture(scope="module")
def ranker_dir(ray_local, tmp_path_factory):
    return random_ranker(tmp_path_factory.mktemp("eval"))


def test_left_padded_batch_ranks_like_single_prompts(ranker_dir):
    ranker = load_ranker(ranker_dir / "ranker")
    rows = read_split(ranker_dir / "data", "test").to_dict("records")[:3]
    prompts = [prompt_ids(r) for r in rows]
    prompts[1] = prompts[1][5:]  # make lengths differ so the batch is padded
    for mode in ("one-pass", "generate"):
        batched, scores = rank_batch(ranker.model, prompts, ranker.rank_tokenizer.identifier_ids, mode,
                                     ranker.tokenizer.pad_token_id)
        for p, order, s in zip(prompts, batched, scores):
            single, single_scores = rank_batch(ranker.model, [p], ranker.rank_tokenizer.identifier_ids, mode,
                                               ranker.tokenizer.pad_token_id)
            assert single[0] == order
            assert torch.allclose(torch.tensor(single_scores[0]), torch.tensor(s), atol=1e-4)


def test_bootstrap_copies_use_their_own_orders(ranker_dir):
    ranker = load_ranker(ranker_dir / "ranker")
    row = read_split(ranker_dir / "data", "test").to_dict("records")[0]
    seen = []

    def prompt_for(r, perm):
        seen.append((r, tuple(perm)))
        return prompt_ids(row)

    orders = bootstrap_orders(ranker.model, prompt_for, [1, 2], 5, 4, ranker.tokenizer.pad_token_id,
                              ranker.rank_tokenizer.identifier_ids)
    assert all(sorted(o) == list(range(5)) for o in orders)
    for r in (0, 1):
        perms = [p for rr, p in seen if rr == r]
        assert perms[0] == (0, 1, 2, 3, 4) and len(set(perms)) == 4
    assert [p for r, p in seen if r == 0] != [p for r, p in seen if r == 1]


def test_evaluation_job_writes_predictions_metrics_and_report(ranker_dir, tmp_path):
    metrics = run_evaluation(ranker_dir / "ranker", tmp_path, settings=EvalSettings(
        modes="generate,one-pass,free,bootstrap@2", baselines=["random", "popularity"], batch_size=3, reorders=2))
    import pandas as pd

    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    test = read_split(ranker_dir / "data", "test")
    assert len(preds) == 4 * len(test)
    truth = {r["user"]: sorted(r["candidate_ids"]) for r in test.to_dict("records")}
    assert all(sorted(p["predicted_ids"]) == truth[p["user"]] for p in preds.to_dict("records"))
    for mode, m in metrics["modes"].items():
        assert m["lists"] == len(test) and 0 < m["ndcg@3"] <= 1 and m["tpq_seconds"] > 0
        assert 0 <= m["repair_rate"] <= 1 and len(m["position_bias"]["mean_rank_by_position"]) == 5
    assert metrics["modes"]["generate"]["repair_rate"] == 0
    for m in metrics["modes"].values():  # --reorders 2: every mode's lists ranked under 2 more orders
        assert m["reorders"] == 2 and -1 <= m["stability_tau"] <= 1 and 0 <= m["ndcg@10_spread"] <= 1
        assert 1 <= m["first_shown_mean_rank"] <= 5
    assert all(len(r) == 2 and all(sorted(x) == [1, 2, 3, 4, 5] for x in r) for r in preds["reorder_ranks"])
    # Each reorder, ranked here by hand, is what the job stored for it (mapped back to the list's
    # candidates; mapped back the wrong way, by the inverse order, few of these 8 rankings match).
    ranker, renderer = load_ranker(ranker_dir / "ranker"), load_renderer(ranker_dir / "data")
    for row in test.to_dict("records"):
        stored = preds[(preds["user"] == row["user"]) & (preds["mode"] == "generate")]["reorder_ranks"].iloc[0]
        for shown, ranks in zip(reorders_for(str(row["user"]), 5, 2, seed=0), stored):
            prompt, _ = ranker.rank_tokenizer.prompt_ids(renderer.prefix(row), renderer.suffix(row, shown))
            (order,), _ = ranker.rank([prompt], "generate")
            assert list(ranks) == item_ranks([shown[j] for j in order])
    assert set(metrics["baselines"]) == {"random", "popularity"}
    assert json.loads((tmp_path / "metrics.json").read_text())["split"] == "test"
    report = (tmp_path / "report.md").read_text()
    assert "ranker: bootstrap@2" in report and "popularity" in report and "τ across reorders" in report
    assert (tmp_path / "ndcg.png").stat().st_size > 1000 and (tmp_path / "position_bias.png").exists()


@pytest.mark.slow  # default-run time (issue 26): a second evaluation, with 2 actors on 2 CPUs (a hang's regression test)
def test_an_actor_pool_holding_every_cpu_still_gets_its_rows(ranker_dir, tmp_path):
    """--actors 2 on a 2-CPU cluster, with --fuse (test and valid read): the rows are read before
    the actors start. Reading them lazily left Ray Data no budget for the read tasks (even
    zero-CPU ones) and the job waited forever, so this runs in a thread with a deadline."""
    import threading

    done = {}
    job = threading.Thread(daemon=True, target=lambda: done.setdefault("m", run_evaluation(
        ranker_dir / "ranker", tmp_path, settings=EvalSettings(modes=["one-pass"], baselines=[], actors=2,
                                                               fuse=["item-mean"]))))
    job.start()
    job.join(timeout=300)
    assert "m" in done, "the evaluation with 2 actors on 2 CPUs did not finish in 5 minutes"
    assert done["m"]["modes"]["one-pass"]["lists"] == len(read_split(ranker_dir / "data", "test"))


def test_limit_ranks_the_first_lists_in_file_order(ranker_dir, tmp_path):
    """--limit N: the split's first N lists in file order, the same lists for every ranker of a
    comparison, and predictions.parquet in that order. Ray Data's read_parquet + limit took the
    rows of whichever read tasks finished first (on ML-100K's top-N test split, 109 of the 400 it
    should have); without preserve_order the blocks' finish order set the rows' order, and the
    metrics' float sums moved in the last bits."""
    data = tmp_path / "data"
    shutil.copytree(ranker_dir / "data", data)
    table = read_split_table(data, "test")
    for f in (data / "test").glob("*.parquet"):
        f.unlink()
    quarter = -(-len(table) // 4)
    for i in range(4):  # four files, so that four read tasks would race
        pq.write_table(table.slice(i * quarter, quarter), data / "test" / f"part-{i}.parquet")
    limit = len(table) // 2
    run_evaluation(ranker_dir / "ranker", tmp_path / "ev", data,
                   EvalSettings(modes=["one-pass"], baselines=[], limit=limit))
    ranked = pd.read_parquet(tmp_path / "ev" / "predictions.parquet")["user"].astype(str)
    assert list(ranked) == list(map(str, table["user"].to_pylist()[:limit]))  # in that order too


@pytest.mark.slow  # default-run time: another evaluation; the default evaluation test covers the job
def test_one_actor_with_every_cpu_ranks_the_split(ranker_dir, tmp_path):
    """--cpus-per-actor 2 on the 2-CPU cluster: the actor holds every CPU (its torch ranks on 2
    threads) and still gets its rows (read before it starts), within a deadline."""
    import threading

    done = {}
    job = threading.Thread(daemon=True, target=lambda: done.setdefault("m", run_evaluation(
        ranker_dir / "ranker", tmp_path, settings=EvalSettings(modes=["one-pass"], baselines=[], cpus_per_actor=2))))
    job.start()
    job.join(timeout=300)
    assert "m" in done, "the evaluation with 1 actor of 2 CPUs did not finish in 5 minutes"
    assert done["m"]["modes"]["one-pass"]["lists"] == len(read_split(ranker_dir / "data", "test"))


def test_bad_inputs_fail_before_any_actor(ranker_dir, tmp_path):
    # More CPUs than the cluster has (2): the pool would wait forever.
    with pytest.raises(AlroError, match="reserve 4 CPUs; the Ray cluster has 2"):
        run_evaluation(ranker_dir / "ranker", tmp_path / "o0", settings=EvalSettings(actors=2, cpus_per_actor=2))
    with pytest.raises(AlroError, match="expected at least 1 of each"):
        run_evaluation(ranker_dir / "ranker", tmp_path / "o0", settings=EvalSettings(cpus_per_actor=0))
    with pytest.raises(AlroError, match="bootstrap@p needs an integer"):
        parse_modes("generate,bootstrap@x")
    with pytest.raises(AlroError, match="unknown ranking mode 'beam'"):
        parse_modes(["beam"])
    broken = tmp_path / "broken"
    shutil.copytree(ranker_dir / "ranker", broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(AlroError, match="missing adapter/adapter_config.json"):
        run_evaluation(broken, tmp_path / "o1")
    # Data prepared with C=4 (its stats.json says so): refused by what stats.json says, before any work.
    shutil.copytree(ranker_dir / "data", tmp_path / "c4")
    stats = json.loads((tmp_path / "c4" / "stats.json").read_text())
    (tmp_path / "c4" / "stats.json").write_text(json.dumps({**stats, "candidates": 4}))
    with pytest.raises(AlroError, match="C=4 candidates per list, the ranker was trained with C=5"):
        run_evaluation(ranker_dir / "ranker", tmp_path / "o2", data_dir=tmp_path / "c4")


def test_evaluation_of_a_nan_ranker_fails_with_the_message_and_writes_no_metrics(ranker_dir, tmp_path, capsys):
    """A ranker whose adapter is NaN: `alro evaluate` exits non-zero with the actor's message
    (not a remote traceback), and no metrics.json holds an NDCG computed from NaN scores."""
    from alro_ray.cli import main

    cfg = load_config("configs/tiny.yaml", TINY)
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.fill_(float("nan"))
    save_ranker(tmp_path / "nan", model, load_tokenizer("tiny-random"), cfg, read_stats(ranker_dir / "data"),
                ranker_dir / "data")
    out = tmp_path / "out"
    code = main(["evaluate", "--checkpoint", str(tmp_path / "nan"), "--out", str(out), "--modes", "one-pass",
                 "--baselines", "", "--limit", "3"])
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("alro evaluate: error:")]
    assert code == 2 and len(line) == 1
    assert "evaluation stopped, no metrics written: one-pass ranking: the model's scores are NaN" in line[0]
    assert "users:" in line[0] and "UserCodeException" not in line[0]
    assert not (out / "metrics.json").exists() and not (out / "predictions.parquet").exists()
