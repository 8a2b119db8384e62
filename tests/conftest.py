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


@pytest.fixture(scope="session")
def tiny_data(ray_local, tmp_path_factory):
    """configs/tiny.yaml's data, prepared once for the session (a Ray Data job costs ~15 s here).
    `with_tiny_data` copies it into a run directory, where run_training and run_tune find data
    prepared with their own data.* config and use it instead of preparing it again."""
    from alro_ray.config import load_config
    from alro_ray.data.prepare import prepare

    out = tmp_path_factory.mktemp("tiny") / "data"
    prepare(load_config("configs/tiny.yaml"), out)
    return out


def with_tiny_data(tiny_data, run_dir):
    """run_dir with RUN/data a copy of the session's prepared tiny data (a copy: a run may add to it)."""
    import shutil

    shutil.copytree(tiny_data, run_dir / "data")
    return run_dir


def random_ranker(root, *overrides):
    """Prepare tiny synthetic data under root/data and save a ranker whose adapter is random (an
    untrained adapter is all zeros, so it would not matter) under root/ranker."""
    import torch

    from alro_ray.config import load_config
    from alro_ray.data.dataset import read_stats
    from alro_ray.data.prepare import prepare
    from alro_ray.rank.ranker import save_ranker
    from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer

    cfg = load_config("configs/tiny.yaml", ["data.synthetic.users=40", "data.permutations=0", *overrides])
    prepare(cfg, root / "data")
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    save_ranker(root / "ranker", model, load_tokenizer("tiny-random"), cfg, read_stats(root / "data"), root / "data")
    return root


def objective_rows(*overrides):
    """configs/tiny.yaml's model (LoRA dropout 0, LoRA B non-zero so the adapter matters) and three
    rendered training rows (H=6, C=5, 2 stored permutations): (cfg, rows as a dict of columns,
    model, RankTokenizer), for tests of the training objective on a real (tiny) model."""
    import pyarrow as pa
    import torch

    from alro_ray.config import load_config
    from alro_ray.data.dataset import SAMPLE_SCHEMA
    from alro_ray.data.prepare import RenderTokenize, item_table
    from alro_ray.data.samples import user_samples
    from alro_ray.data.synthetic import generate
    from alro_ray.model.loading import add_lora, load_base_model

    cfg = load_config("configs/tiny.yaml", ["model.lora.dropout=0.0", *overrides])
    source = generate(cfg.data.synthetic)
    items, _ = item_table(source, cfg)
    df = source.interactions.sort_values(["user", "timestamp", "item"])
    rows = []
    for user, g in df.groupby("user"):
        rows += user_samples(user, g["item"].tolist(), g["rating"].tolist(), g["timestamp"].tolist(),
                             split="train", history=6, candidates=5, windows=1, permutations=2, seed=0)
        if len(rows) >= 3:
            break
    render = RenderTokenize("tiny-random", None, 5, items, source.attribute_name, source.domain_plural)
    table = render(pa.Table.from_pylist(rows[:3], schema=SAMPLE_SCHEMA))
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return cfg, table.to_pydict(), model, render.tok
