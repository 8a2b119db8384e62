"""alro_ray/compat.py: the one check that data, tokenizer, loss and ranker agree (train, tune,
evaluate and Serve all call it), each refusal with its reason."""

import pytest

from alro_ray.compat import check_ranker_on_data, check_ranker_tokenizer, check_training
from alro_ray.config import load_config
from alro_ray.data.tokenize import identifier_token_ids
from alro_ray.errors import AlroError
from alro_ray.model.loading import load_tokenizer


@pytest.fixture(scope="module")
def ids():
    return identifier_token_ids(load_tokenizer("tiny-random", None), 5)


def _stats(ids, permutations=1, train_rows=10):
    return {"candidates": 5, "identifier_ids": ids, "tokenizer": "tiny-random",
            "config": {"data": {"permutations": permutations}}, "rows": {"train": train_rows}}


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
    other = _stats([i + 1 for i in ids]) | {"tokenizer": "other-model"}
    with pytest.raises(AlroError, match="prepared with tokenizer 'other-model', whose identifier ids differ"):
        check_training(load_config("configs/tiny.yaml"), other)


def test_ranker_against_data_and_its_own_tokenizer(ids):
    info = {"candidates": 5, "identifier_ids": ids, "tokenizer": "tiny-random"}
    check_ranker_on_data(info, _stats(ids), "d")
    check_ranker_tokenizer("ckpt", ids, info)
    with pytest.raises(AlroError, match="d has C=6 candidates per list, the ranker was trained with C=5"):
        check_ranker_on_data(info, _stats(ids) | {"candidates": 6}, "d")
    with pytest.raises(AlroError, match="whose identifier tokens differ from the ranker's"):
        check_ranker_on_data(info, _stats(ids[::-1]), "d")
    with pytest.raises(AlroError, match="ckpt: the saved tokenizer's identifier ids differ from ranker.json"):
        check_ranker_tokenizer("ckpt", ids[::-1], info)
