"""configs/paper_gpu.yaml's training path, run on 2 CPU workers (configs/paper_cpu.yaml): DeepSpeed
ZeRO-2 in bf16 with gradient checkpointing, H=20, C=25, a fresh permutation each epoch, validation in
generate mode, through run_training on a real local Ray. Everything a GPU user of paper_gpu runs
but the device itself; about a minute here."""

import math

import pytest
import torch
from safetensors.torch import load_file

from alro_ray.config import load_config
from alro_ray.data.dataset import read_split
from alro_ray.rank.evaluation import prompt_ids
from alro_ray.rank.ranker import load_ranker
from alro_ray.train.checkpoints import missing_parts
from alro_ray.train.objective import collate
from alro_ray.train.trainer import run_training

CONFIG = "configs/paper_cpu.yaml"


@pytest.fixture(scope="module")
def paper(ray_local, tmp_path_factory):
    cfg = load_config(CONFIG)
    return cfg, run_training(cfg, tmp_path_factory.mktemp("paper"))  # prepares its own H=20, C=25 data


def test_config_keeps_paper_gpus_training_settings():
    cfg, gpu = load_config(CONFIG), load_config("configs/paper_gpu.yaml")
    assert (cfg.data.history, cfg.data.candidates, cfg.loss, cfg.model.lora) == (20, 25, gpu.loss, gpu.model.lora)
    t, g = cfg.train, gpu.train
    assert (t.precision, t.gradient_checkpointing, t.zero_stage, t.micro_batch, t.lr, t.eval_mode) == (
        g.precision, g.gradient_checkpointing, g.zero_stage, g.micro_batch, g.lr, g.eval_mode) == (
        "bf16", True, 2, 1, 1e-4, "generate")
    assert (t.use_gpu, t.num_workers, t.epochs, cfg.model.name) == (False, 2, 2, "tiny-random")
    assert cfg.data.permutations >= t.epochs  # a fresh permutation in each epoch


def test_deepspeed_trains_in_bf16_with_gradient_checkpointing(paper):
    cfg, outcome = paper
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    for h in outcome.history:
        # what the engine ran, read off it in the worker (train/worker.py engine_setup)
        assert (h["dtype"], h["gradient_checkpointing"]) == ("bfloat16", True)
        for key in ("train_loss", "train_sft", "train_rank", "train_perm", "valid_ndcg@10", "valid_ndcg@25"):
            assert math.isfinite(h[key]), key
        assert h["train_rank"] > 0 and h["train_perm"] > 0 and h["nonfinite_steps"] == 0
    run = outcome.output_dir / "ray" / cfg.train.run_name
    for epoch in (1, 2):  # each epoch's checkpoint whole: a rerun could resume from it
        assert not missing_parts(run / f"epoch_{epoch:03d}")
    ds = run / "epoch_002" / "ds"
    module = torch.load(ds / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and {w.dtype for w in module.values()} == {torch.bfloat16}  # the LoRA weights DeepSpeed trained
    for rank in (0, 1):  # DeepSpeed's bf16 ZeRO optimizer: one shard per worker, fp32 master weights
        shard = torch.load(ds / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           weights_only=False)["optimizer_state_dict"]
        assert shard["zero_stage"] == 2
        assert {w.dtype for w in shard["single_partition_of_fp32_groups"]} == {torch.float32}
    lora_b = [w for n, w in load_file(outcome.final_dir / "adapter" / "adapter_model.safetensors").items()
              if "lora_B" in n]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # stepped: gradients came through the checkpointed layers


def test_each_epoch_takes_another_permutation(paper):
    """Epoch e collates permutation e mod K of each row (epoch.py: perm_index=epoch): the prepared
    rows hold K distinct ones, so the two epochs' permuted prompts differ."""
    cfg, outcome = paper
    rows = read_split(outcome.data_dir, "train")
    assert len(rows) > 0 and all(len(p) == cfg.data.permutations for p in rows["perm_orders"])
    columns = {k: list(v) for k, v in rows.items()}
    first, second = (collate(columns, perm_index=epoch) for epoch in (0, 1))
    assert all(sorted(o.tolist()) == list(range(25)) for o in first.perm_order)
    assert all(not torch.equal(a, b) for a, b in zip(first.perm_order, second.perm_order))


def test_final_ranker_ranks_the_test_rows_in_generate_mode(paper):
    _, outcome = paper
    ranker = load_ranker(outcome.final_dir)
    rows = read_split(outcome.data_dir, "test").to_dict("records")
    orders, _ = ranker.rank([prompt_ids(r) for r in rows], "generate")
    assert len(orders) == len(rows) > 0 and all(sorted(o) == list(range(25)) for o in orders)
