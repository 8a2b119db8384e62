"""Shared fixtures: one local Ray per test session (each start costs seconds), the offline tokenizer."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from alro_ray.model.loading import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from alro_ray.cluster import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
