"""The training loop's non-finite guard and its pieces, without Ray: the all-workers decision over
a real 2-process gloo group, DeepSpeed's own skip of a non-finite update, counting and stopping,
the weights check, the LR schedules, the output-directory probe."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from alro_ray.errors import AlroError, NonFiniteError
from alro_ray.train import guard
from alro_ray.train.trainer import check_writable
from alro_ray.train.worker import make_scheduler, skip_inference_comm_op


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [[False, True], [False, False]]  # per case, each rank's flag: one rank non-finite; none


def _agree(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:  # every case in one process group: a spawn of 2 processes costs seconds here
        results[rank] = [(guard.any_rank(flags[rank]), guard.gather_users([f"u{rank}"] if flags[rank] else []))
                         for flags in CASES]
    finally:
        dist.destroy_process_group()


def test_every_worker_takes_the_same_decision():
    results = mp.Manager().dict()
    mp.spawn(_agree, args=(_free_port(), results), nprocs=2)
    expected = [(any(flags), [f"u{r}" for r, f in enumerate(flags) if f]) for flags in CASES]
    assert dict(results) == {0: expected, 1: expected}


def test_deepspeed_zero2_skips_a_non_finite_update_without_touching_state(monkeypatch):
    """What the loop relies on: under ZeRO-2 in fp32 DeepSpeed drops an update whose gradient norm
    is not finite: parameters, optimizer state and the LR schedule stay as they were."""
    import deepspeed

    skip_inference_comm_op()
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, 10, 0.0, "linear")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    try:
        from deepspeed.comm import comm as ds_comm

        assert ds_comm.cdb.shm_comm_op is None  # skip_inference_comm_op: the inference op not compiled
        before = [p.detach().clone() for p in engine.module.parameters()]
        engine.backward(engine(torch.tensor([[1.0, float("inf"), 0.0]])).sum())
        engine.step()
        assert not engine.was_step_applied() and not math.isfinite(engine.get_global_grad_norm())
        assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        assert scheduler.get_last_lr() == [0.1]
        engine.backward(engine(torch.tensor([[1.0, 2.0, 0.0]])).sum())
        engine.step()
        assert engine.was_step_applied() and math.isclose(scheduler.get_last_lr()[0], 0.09)
        assert not all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    finally:
        engine.destroy()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_skips_are_counted_and_one_too_many_stops_the_run():
    checks = guard.NonFiniteGuard(limit=2, skipped_before=1)
    checks.start_epoch()
    checks.skipped("gradient norm", 2, "7 (micro-batch 1/2)", ["u1", "u2"])
    assert (checks.total, checks.epoch_count) == (2, 1)
    assert checks.last == "non-finite gradient norm at epoch 2, step 7 (micro-batch 1/2) (users u1, u2)"
    checks.start_epoch()
    assert checks.epoch_count == 0
    with pytest.raises(NonFiniteError) as e:
        checks.skipped("loss", 3, "1 (micro-batch 2/2)", [f"u{i}" for i in range(10)])
    text = str(e.value)
    assert "non-finite loss at epoch 3, step 1 (micro-batch 2/2) (users u0, u1, u2, u3, u4, u5, u6, u7 and 2 more)" in text
    assert "3 non-finite steps in this run, more than train.max_nonfinite_steps=2" in text
    assert "lower train.lr" in text and "fp32" in text


def test_non_finite_trainable_weights_are_never_saved():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # frozen: not what training changed
    guard.check_weights(model, 1)
    with torch.no_grad():
        model[1].bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite weights after epoch 4 \(1.bias\); no checkpoint"):
        guard.check_weights(model, 4)


@pytest.mark.parametrize("schedule, ratio, expected", [
    # warmup = max(1, int(10 * 0.2)) = 2 steps from 0, then the schedule over the other 8
    ("linear", 0.2, [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0]),
    ("cosine", 0.2, [0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(9)]),
    ("constant", 0.2, [0, 0.5] + [1] * 9),
    ("linear", 0.0, [1 - k / 10 for k in range(11)]),
    ("constant", 0.0, [1] * 11),
])
def test_schedules(schedule, ratio, expected):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = make_scheduler(optimizer, 10, ratio, schedule)
    lrs = []
    for _ in range(11):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.0 * f for f in expected])


def test_an_unwritable_output_directory_is_refused_before_training(tmp_path):
    # Tests run as root, whom chmod does not stop: a path under a regular file is unwritable for anyone.
    (tmp_path / "file").write_text("")
    with pytest.raises(AlroError, match=r"cannot write to the output directory .*file/run: .*--output-dir"):
        check_writable(tmp_path / "file" / "run")
    check_writable(tmp_path / "ok" / "run")
    assert os.listdir(tmp_path / "ok" / "run") == []
