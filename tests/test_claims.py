"""ALRO's claims from a compare output (evaluate/claims.py), on hand-made evaluations: every
expected number is worked out in the comments."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from alro_ray.errors import AlroError
from alro_ray.evaluate.claims import Ladder, measure_claims, write_claims

RATINGS = [3.0, 1.0, 2.0]  # by the list's own candidate positions
BEST, WORST = [0, 2, 1], [1, 2, 0]  # positions best first


def ranks(order):
    out = [0] * len(order)
    for r, j in enumerate(order):
        out[j] = r + 1
    return out


def row(user, orders, seconds):
    """A test row ranked in `orders[0]` and, under its reorders, in `orders[1:]` (own positions)."""
    return {"user": user, "split": "test", "mode": "score", "seconds": seconds, "target_ratings": RATINGS,
            "predicted_ratings": [RATINGS[j] for j in orders[0]], "rank_of_position": ranks(orders[0]),
            "reorder_ranks": [ranks(o) for o in orders[1:]],
            "reorder_ratings": [[RATINGS[j] for j in o] for o in orders[1:]]}


def dcg(ratings):
    return sum((2 ** r - 1) / math.log2(n + 2) for n, r in enumerate(ratings))


# NDCG@10 of the worst order: ratings [1, 2, 3] against the ideal [3, 2, 1]
NDCG_WORST = dcg([1, 2, 3]) / dcg([3, 2, 1])


def write(out, variant, seed_rows):
    for i, rows in enumerate(seed_rows):
        name = variant if i == 0 else f"{variant}-seed{i}"
        (out / "eval" / name).mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(out / "eval" / name / "predictions.parquet")


@pytest.fixture
def compare_dir(tmp_path):
    users = ["u1", "u2"]
    # ALRO: the best order under every reorder, in both seeds: NDCG 1, tau 1.
    write(tmp_path, "alro", [[row(u, [BEST, BEST, BEST], 0.1) for u in users]] * 2)
    # SFT: the worst order in seed 0, the best in seed 1: per list mean (NDCG_WORST + 1) / 2.
    write(tmp_path, "sft", [[row(u, [WORST] * 3, 0.1) for u in users], [row(u, [BEST] * 3, 0.1) for u in users]])
    # w/o SLL: the worst order in both seeds.
    write(tmp_path, "wo-sll", [[row(u, [WORST] * 3, 0.1) for u in users]] * 2)
    # w/o PSL: the best order as shown, the worst under both reorders. Borda over the three:
    # candidate 0 at positions 0+2+2, 1 at 2+0+0, 2 at 1+1+1: the worst order; tau over the pairs
    # (best, worst) twice and (worst, worst) once: (-1 - 1 + 1) / 3 = -1/3. TPQ 0.2 s.
    write(tmp_path, "wo-psl", [[row(u, [BEST, WORST, WORST], 0.2) for u in users]] * 2)
    return tmp_path


def test_claims_hand_example(compare_dir, tmp_path):
    ladder = Ladder(path="planted", alro="alro", sft="sft", wo_sll="wo-sll", wo_psl="wo-psl", seeds=(0, 1), bootstrap=3)
    records = {r["claim"]: r for r in measure_claims(compare_dir, ladder)}
    assert list(records) == ["alro-vs-sft", "sll", "psl", "psl-vs-bootstrap", "stability"]
    assert records["alro-vs-sft"]["diff_ndcg@10"] == pytest.approx(1 - (NDCG_WORST + 1) / 2)
    assert records["sll"]["diff_ndcg@10"] == pytest.approx(1 - NDCG_WORST)
    assert records["sll"]["ci95"] == pytest.approx([1 - NDCG_WORST] * 2)  # every list the same difference
    assert records["psl"]["diff_ndcg@10"] == pytest.approx(0.0)
    boot = records["psl-vs-bootstrap"]
    assert boot["reference"] == "wo-psl bootstrap@3" and boot["diff_ndcg@10"] == pytest.approx(1 - NDCG_WORST)
    # the one pass: the slowest ranker's 0.2 s (w/o PSL's); bootstrap@3: three of those
    assert boot["tpq_seconds"] == pytest.approx({"one_pass": 0.2, "bootstrap@3": 0.6})
    assert boot["tpq_ratio"] == pytest.approx(1 / 3)
    stab = records["stability"]
    assert stab["tau"] == pytest.approx({"with_psl": 1.0, "without_psl": -1 / 3})
    assert stab["tau_diff"] == pytest.approx(4 / 3) and stab["instability_ratio"] == pytest.approx(0.0)
    assert all(r["lists"] == 2 and r["seeds"] == [0, 1] and r["path"] == "planted" for r in records.values())
    write_claims(list(records.values()), tmp_path / "out" / "claims.json")
    assert json.loads((tmp_path / "out" / "claims.json").read_text())[0]["claim"] == "alro-vs-sft"
    assert "| stability | planted | alro | wo-psl |" in (tmp_path / "out" / "claims.md").read_text()
    other = [{**r, "path": "elsewhere", "diff_ndcg@10": 0.5} for r in records.values()]
    write_claims(other, tmp_path / "out" / "claims.json")  # another path joins the file
    write_claims(list(records.values()), tmp_path / "out" / "claims.json")  # this path's records replaced
    saved = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert sorted(r["path"] for r in saved) == ["elsewhere"] * 5 + ["planted"] * 5
    assert "| alro-vs-sft | elsewhere |" in (tmp_path / "out" / "claims.md").read_text()


def test_claims_name_what_is_missing(compare_dir):
    with pytest.raises(AlroError, match="variant 'alro' seeds 0, 2"):
        measure_claims(compare_dir, Ladder(path="p", alro="alro", sft="sft", wo_sll="wo-sll", wo_psl="wo-psl",
                                           seeds=(0, 1, 2)))
    with pytest.raises(AlroError, match="--reorders 4 or more"):
        measure_claims(compare_dir, Ladder(path="p", alro="alro", sft="sft", wo_sll="wo-sll", wo_psl="wo-psl",
                                           seeds=(0, 1), bootstrap=5))


def test_seeds_trained_in_separate_runs_are_found_by_their_names(compare_dir):
    """The plain row is the one seed without a `-seed<s>` row, whichever it is (alro compare
    --seeds 1,2 beside an earlier seed-0 run): the hand example's numbers with seed 1 renamed 5."""
    for variant in ("alro", "sft", "wo-sll", "wo-psl"):
        (compare_dir / "eval" / f"{variant}-seed1").rename(compare_dir / "eval" / f"{variant}-seed5")
    ladder = Ladder(path="p", alro="alro", sft="sft", wo_sll="wo-sll", wo_psl="wo-psl", seeds=(5, 0), bootstrap=3)
    records = {r["claim"]: r for r in measure_claims(compare_dir, ladder)}
    assert records["alro-vs-sft"]["diff_ndcg@10"] == pytest.approx(1 - (NDCG_WORST + 1) / 2)
    assert records["alro-vs-sft"]["seeds"] == [5, 0]


def test_a_reference_left_out_leaves_out_its_claims(compare_dir):
    def claims(**refs):
        ladder = Ladder(path="p", alro="alro", **{"sft": None, "wo_sll": None, "wo_psl": None, **refs},
                        seeds=(0, 1), bootstrap=3)
        return {r["claim"]: r for r in measure_claims(compare_dir, ladder)}

    only_sft = claims(sft="sft")
    assert list(only_sft) == ["alro-vs-sft"]
    assert only_sft["alro-vs-sft"]["diff_ndcg@10"] == pytest.approx(1 - (NDCG_WORST + 1) / 2)
    only_psl = claims(wo_psl="wo-psl")
    assert list(only_psl) == ["psl", "psl-vs-bootstrap", "stability"]
    # the same numbers as with the whole ladder (test_claims_hand_example)
    assert only_psl["psl-vs-bootstrap"]["diff_ndcg@10"] == pytest.approx(1 - NDCG_WORST)
    assert only_psl["stability"]["tau"] == pytest.approx({"with_psl": 1.0, "without_psl": -1 / 3})
    with pytest.raises(AlroError, match="no claim to measure"):
        claims()


def test_alro_claims_command_writes_the_records_and_prints_the_table(compare_dir, capsys):
    from alro_ray import cli

    args = ["claims", "--compare", str(compare_dir), "--path", "planted", "--alro", "alro", "--sft", "sft",
            "--wo-sll", "wo-sll", "--wo-psl", "wo-psl", "--seeds", "0,1", "--bootstrap", "3"]
    assert cli.main(args) == 0
    records = json.loads((compare_dir / "claims.json").read_text())
    assert [r["claim"] for r in records] == ["alro-vs-sft", "sll", "psl", "psl-vs-bootstrap", "stability"]
    assert "| psl | planted | alro | wo-psl | +0.0000 |" in capsys.readouterr().out
    assert cli.main([*args[:-2], "--bootstrap", "1"]) == 2  # bootstrap@1 is the one pass
    capsys.readouterr()
    partial = [a for a in args if a not in ("--wo-sll", "wo-sll", "--wo-psl", "wo-psl")]
    assert cli.main(partial) == 0  # a ladder still training: SFT's claim only
    assert "left out (no reference row named): sll, psl, psl-vs-bootstrap, stability" in capsys.readouterr().out
    assert [r["claim"] for r in json.loads((compare_dir / "claims.json").read_text())] == ["alro-vs-sft"]
