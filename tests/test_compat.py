"""alro_ray/compat.py: the one check that data, tokenizer, loss and ranker agree (train, tune,
evaluate and Serve all call it), each refusal with its reason."""

import dataclasses

import pytest

from alro_ray.compat import check_ranker_on_data, check_ranker_tokenizer, check_training
from alro_ray.config import load_config
from alro_ray.data.dataset import ranking_stats
from alro_ray.data.tokenize import identifier_token_ids
from alro_ray.errors import AlroError
from alro_ray.model.loading import load_tokenizer
from alro_ray.model.ranker_info import RankerInfo


@pytest.fixture(scope="module")
def ids():
    return identifier_token_ids(load_tokenizer("tiny-random", None), 5)


def _stats(ids, permutations=1, train_rows=10, candidates=5, tokenizer="tiny-random"):
    return ranking_stats(candidates, 3, ids, tokenizer, rows={"train": train_rows},
                         config={"data": {"permutations": permutations}})


def test_training_data_that_fits_passes(ids):
    check_training(load_config("configs/tiny.yaml"), _stats(ids))


@pytest.mark.parametrize("stats_kw, overrides, searched, message", [
    ({"permutations": 0}, ["loss.beta=0.01"], False, "loss.beta > 0 needs permuted prompts"),
    ({"permutations": 0}, ["loss.beta=0"], True, "the study searches loss.beta"),
    ({"train_rows": 1}, ["train.num_workers=2"], False, "1 training rows for 2 workers"),
])
def test_training_refusals(ids, stats_kw, overrides, searched, message):
    with pytest.raises(AlroError, match=message):
        check_training(load_config("configs/tiny.yaml", overrides), _stats(ids, **stats_kw), beta_searched=searched)


def test_data_prepared_with_another_tokenizer_is_refused(ids):
    other = _stats([i + 1 for i in ids], tokenizer="other-model")
    with pytest.raises(AlroError, match="prepared with tokenizer 'other-model', whose identifier ids differ"):
        check_training(load_config("configs/tiny.yaml"), other)


def test_ranker_against_data_and_its_own_tokenizer(ids):
    info = RankerInfo("tiny-random", 5, 3, ids, "items", "genres", "tiny-random")
    check_ranker_on_data(info, _stats(ids), "d")
    check_ranker_tokenizer("ckpt", ids, info)
    with pytest.raises(AlroError, match="d has C=6 candidates per list, the ranker was trained with C=5"):
        check_ranker_on_data(info, _stats(ids, candidates=6), "d")
    with pytest.raises(AlroError, match="whose identifier tokens differ from the ranker's"):
        check_ranker_on_data(info, _stats(ids[::-1]), "d")
    with pytest.raises(AlroError, match="ckpt: the saved tokenizer's identifier ids differ from ranker.json"):
        check_ranker_tokenizer("ckpt", ids[::-1], info)


def test_contract_files_round_trip_and_refuse_what_they_are_not(tmp_path):
    """stats.json and ranker.json read back as the typed records they were written from; a file of
    another format or with a required key missing is refused by name."""
    from alro_ray.data.dataset import read_stats, write_stats
    from alro_ray.errors import DataError
    from alro_ray.model.ranker_info import FILE, read_ranker_info, write_ranker_info

    stats = _stats([1, 2, 3, 4, 5])
    write_stats(stats, tmp_path)
    assert read_stats(tmp_path) == stats
    (tmp_path / "stats.json").write_text('{"format": "alro-prepared-v1", "rows": {}}')
    with pytest.raises(DataError, match="missing .*'candidates'"):
        read_stats(tmp_path)
    info = RankerInfo("tiny-random", 5, 3, [1, 2, 3, 4, 5], "items", "genres", "tiny-random")
    for need in ("adapter", "tokenizer"):
        (tmp_path / need).mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("{}")
    write_ranker_info(info, tmp_path)
    assert read_ranker_info(tmp_path) == info
    assert "head" not in (tmp_path / FILE).read_text()  # written only when there is one, as before
    (tmp_path / FILE).write_text('{"format": "alro-ranker-v0"}')
    with pytest.raises(AlroError, match="format 'alro-ranker-v0', expected 'alro-ranker-v1'"):
        read_ranker_info(tmp_path)
    assert dataclasses.replace(info, head={"kind": "linear"}).to_dict()["head"] == {"kind": "linear"}
