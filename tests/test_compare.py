"""`alro compare` end to end on the tiny model: the ladder's rows and the baselines in one table."""

import json

import pytest

from conftest import with_tiny_data
from alro_ray.cli import main
from alro_ray.evaluate.compare import table_order
from alro_ray.evaluate.results import ndcg_from_predictions, read_predictions


@pytest.mark.slow
def test_compare_writes_one_table_with_ladder_and_baselines(ray_local, tmp_path):
    rc = main(["compare", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path),
               "--ladder", "zero-shot,few-shot,SFT", "--baselines", "random,item-mean", "--few-shot", "1",
               "--seeds", "0,1", "--limit", "6", "--reorders", "1", "train.epochs=1", "train.max_steps_per_epoch=2",
               "data.synthetic.users=60"])
    assert rc == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    trained = {"llm-sft-generate", "llm-sft-bootstrap@3", "llm-sft-bootstrap@5"}
    assert {"random", "item-mean", "llm-zero-shot-generate", "llm-few-shot-generate", *trained,
            *(n.replace("sft-", "sft-seed1-") for n in trained)} == set(rows)
    assert (tmp_path / "runs" / "sft-seed1" / "final").is_dir()
    assert "- llm-sft-generate over 2 seeds" in (tmp_path / "compare.md").read_text()
    assert "Ladder rows: ranking mode generate, 1 epoch(s)" in (tmp_path / "compare.md").read_text()
    assert all(set(r) == {"ndcg@3", "ndcg@10", "ndcg@25"} and 0 < r["ndcg@3"] <= 1 for r in rows.values())
    assert "| llm-sft-bootstrap@5 |" in (tmp_path / "compare.md").read_text()
    predictions = read_predictions(tmp_path / "predictions.parquet")
    assert len(predictions) == 10 * 6 and predictions.groupby("method")["user"].nunique().eq(6).all()
    recomputed = ndcg_from_predictions(predictions)
    assert all(abs(recomputed[m] - rows[m]["ndcg@10"]) < 1e-9 for m in rows)
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["methods"]["llm-sft-generate"]["train_samples"] > 0
    for name, m in details["methods"].items():  # --reorders 1: the llm- rows' stability, not the classical rows'
        if name.startswith("llm-"):
            assert m["reorders"] == 1 and -1 <= m["stability_tau"] <= 1 and 0 <= m["ndcg@10_spread"] <= 1
            assert 1 <= m["first_shown_mean_rank"] <= 5
        else:
            assert "stability_tau" not in m
    assert "τ across reorders" in (tmp_path / "compare.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--variant", "score"], "--variant 'score': expected NAME=CONFIG.yaml"),
    (["--variant", "score=configs/missing.yaml"], "config file not found: configs/missing.yaml"),
    (["--bootstrap", "3,x"], "--bootstrap '3,x': expected comma-separated integers >= 2"),
    (["--seeds", "0,0"], "--seeds '0,0': expected distinct comma-separated integers >= 0"),
])
def test_bad_compare_arguments_stop_before_any_work(tmp_path, capsys, args, message):
    assert main(["compare", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_negative_reorders_stop_before_any_training(tmp_path, capsys):
    assert main(["compare", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path), "--reorders", "-1"]) == 2
    assert "--reorders -1: expected a number of reorders >= 0" in capsys.readouterr().err
    assert [f.name for f in tmp_path.iterdir()] == [".alro-run.lock"]  # no data, no runs


@pytest.mark.slow  # default-run time (issue 26): two prepares of the tiny data
def test_a_variant_must_rank_the_same_lists(tmp_path):
    """A variant may change how prompts look (data.hints), not which lists they hold."""
    from alro_ray.config import load_config
    from alro_ray.data.prepare import prepare
    from alro_ray.errors import AlroError
    from alro_ray.evaluate.compare import same_lists

    base = ["data.synthetic.users=30", "data.permutations=0"]
    prepare(load_config("configs/tiny.yaml", base), tmp_path / "a")
    prepare(load_config("configs/tiny.yaml", [*base, "data.hints=[item_mean]"]), tmp_path / "hints")
    prepare(load_config("configs/tiny.yaml", [*base, "data.seed=1"]), tmp_path / "other")
    same_lists(tmp_path / "a", tmp_path / "hints")
    with pytest.raises(AlroError, match="its test lists differ"):
        same_lists(tmp_path / "a", tmp_path / "other")


def test_a_variant_with_the_tables_data_settings_trains_on_its_prepared_data(tiny_data):
    """A variant that changes only the loss or the seed trains on the table's prepared prompts (and
    the states stored for them), not on a copy prepared again; one that renders prompts otherwise
    prepares its own."""
    from alro_ray.config import load_config
    from alro_ray.evaluate.compare import shares_data

    assert shares_data(load_config("configs/tiny.yaml", ["loss.beta=0.1", "train.seed=3"]), tiny_data)
    assert not shares_data(load_config("configs/tiny.yaml", ["data.hints=[item_mean]"]), tiny_data)
    assert not shares_data(load_config("configs/tiny.yaml", ["data.permutations=1"]), tiny_data)


def test_table_rows_follow_the_ladder_whatever_order_they_came_in():
    came = ["llm-wo-sll-generate", "fused-wo-sll-generate-mf", "mf", "llm-alro-generate", "llm-zero-shot-generate",
            "llm-score", "fused-score-mf", "llm-sft-generate", "llm-sft-bootstrap@3", "random"]
    assert table_order(came, ("random", "mf")) == [
        "random", "mf", "llm-zero-shot-generate", "llm-score", "fused-score-mf", "llm-sft-generate",
        "llm-sft-bootstrap@3", "llm-wo-sll-generate", "fused-wo-sll-generate-mf", "llm-alro-generate"]
    # --merge brings classical rows this run did not fit (the top-N `retriever` among them): after its own
    assert table_order(["llm-x", "retriever", "item-knn", "item-mean", "fused-x-item-knn"], ("item-knn",)) == [
        "item-knn", "retriever", "item-mean", "llm-x", "fused-x-item-knn"]


def test_a_compare_with_nothing_to_rank_tables_the_baselines_with_the_merged_rows(tiny_data, tmp_path, capsys):
    """No ladder and no variant: the table holds the baselines and an earlier run's rows (here a
    planted row that ranks every test list by its true ratings), on those rows' lists."""
    import pandas as pd

    from alro_ray.data.dataset import read_split

    data, earlier, out = with_tiny_data(tiny_data, tmp_path) / "data", tmp_path / "earlier", tmp_path / "out"
    test = read_split(data, "test").to_dict("records")
    earlier.mkdir()
    ideal = [sorted(zip(r["candidate_ratings"], r["candidate_ids"]), key=lambda x: -x[0]) for r in test]
    pd.DataFrame({"method": "llm-planted", "user": [r["user"] for r in test],
                  "ranking": [[i for _, i in pairs] for pairs in ideal],
                  "ratings": [[float(x) for x, _ in pairs] for pairs in ideal]}).to_parquet(earlier / "predictions.parquet")
    (earlier / "details.json").write_text(json.dumps({"methods": {"llm-planted": {"train_samples": 7}}}))
    rc = main(["compare", "--config", "configs/tiny.yaml", "--output-dir", str(out), "--ladder", "", "--bootstrap", "",
               "--baselines", "random,item-mean", "--merge", str(earlier), f"data.prepared={data}"])
    assert rc == 0
    rows = json.loads((out / "compare.json").read_text())
    assert list(rows) == ["random", "item-mean", "llm-planted"]
    assert rows["llm-planted"]["ndcg@10"] == pytest.approx(1.0) and rows["random"]["ndcg@10"] < 1.0
    assert json.loads((out / "details.json").read_text())["methods"]["llm-planted"]["train_samples"] == 7
    assert "| llm-planted |" in capsys.readouterr().out  # the table is printed
    header = (out / "compare.md").read_text().splitlines()[0]  # no ladder row: no ladder settings
    assert "No ladder row" in header and "Ladder rows" not in header and "α=" not in header
    assert read_predictions(out / "predictions.parquet").groupby("method")["user"].nunique().eq(len(test)).all()


def test_seeds_name_their_rows_and_the_table_gives_each_recipe_its_mean_over_seeds(tmp_path):
    """--seeds: each trained row once per train.seed (`-seed<s>` but the config's own), and the recipe's
    level: the seeds' per-list mean against the reference, worked by hand on 4 planted lists."""
    from alro_ray.config import load_config
    from alro_ray.evaluate.compare import seeded
    from alro_ray.rank.metrics import ndcg_at_k
    from alro_ray.evaluate.results import MethodResult, seed_groups, write_results

    cfg = load_config("configs/tiny.yaml")
    rows = seeded("w/o SLL", cfg, [3, 0, 7])  # the config's own seed (0) keeps the plain name, in any order
    assert [(n, c.train.seed, c.train.run_name) for n, c in rows] == [
        ("w/o SLL-seed3", 3, "wo-sll-seed3"), ("w/o SLL", 0, "wo-sll"), ("w/o SLL-seed7", 7, "wo-sll-seed7")]
    assert [n for n, _ in seeded("sft", cfg, [1, 2])] == ["sft-seed1", "sft-seed2"]
    assert [n for n, _ in seeded("score", cfg, [])] == ["score"]
    assert seed_groups(["mf", "llm-x-score", "llm-x-seed1-score", "fused-x-score-mf", "fused-x-seed1-score-mf",
                        "llm-y-seed2-score", "llm-z-seed1-score", "llm-z-seed2-score"]) == {
        "llm-x-score": ["llm-x-score", "llm-x-seed1-score"],
        "fused-x-score-mf": ["fused-x-score-mf", "fused-x-seed1-score-mf"],
        "llm-z-score": ["llm-z-seed1-score", "llm-z-seed2-score"]}  # seeds trained apart from the config's own

    users = ["a", "b", "c", "d"]
    good, bad = [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]  # the ratings in the order each method ranked them

    def row(orders):
        return MethodResult({u: ["i1", "i2", "i3"] for u in users}, dict(zip(users, orders)))
    results = {"item-mean": row([bad, bad, good, good]),
               "llm-x-score": row([good, good, good, good]),
               "llm-x-seed1-score": row([good, bad, good, bad])}
    table = write_results(tmp_path, results, "planted")
    g, b = ndcg_at_k(good, 10), ndcg_at_k(bad, 10)
    details = json.loads((tmp_path / "details.json").read_text())
    (recipe,) = details["seed_means"]
    assert recipe["seeds"] == ["llm-x-score", "llm-x-seed1-score"] and recipe["reference"] == "item-mean"
    assert recipe["ndcg@10"] == [pytest.approx(g), pytest.approx((g + b) / 2)]
    # per list: the seeds' mean minus item-mean's: (g - b), (g+b)/2 - b, 0, (g+b)/2 - g
    assert recipe["ndcg@10_diff"] == pytest.approx(((g - b) + (g - b) / 2 + 0 - (g - b) / 2) / 4)
    assert table["llm-x-score"]["ndcg@10"] == pytest.approx(g)  # the best row is the luckier seed ...
    assert "- llm-x-score over 2 seeds (NDCG@10 " in (tmp_path / "compare.md").read_text()  # ... the recipe is below it
