"""`alro compare` end to end on the tiny model: the ladder's rows and the baselines in one table."""

import json

import pytest

from alro_ray.cli import main


@pytest.mark.slow
def test_compare_writes_one_table_with_ladder_and_baselines(ray_local, tmp_path):
    rc = main(["compare", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path),
               "--ladder", "zero-shot,few-shot,SFT", "--baselines", "random,popularity", "--few-shot", "1",
               "--limit", "6", "train.epochs=1", "train.max_steps_per_epoch=2", "data.synthetic.users=60"])
    assert rc == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert {"random", "popularity", "zero-shot", "few-shot (1)", "SFT", "SFT bootstrap@3", "SFT bootstrap@5"} <= set(rows)
    assert all(0 < r["ndcg@3"] <= 1 for r in rows.values())
    assert "| SFT bootstrap@5 |" in (tmp_path / "compare.md").read_text()
