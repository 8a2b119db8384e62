"""train.ema_decay: the weight average's values by hand, its swap in and out, and its checkpoint file."""

import pytest
import torch

from alro_ray.train.averaging import WeightAverage


def _param(*values):
    return torch.nn.Parameter(torch.tensor(values))


def test_the_average_by_hand_and_the_trained_weights_back_after_it():
    """decay 0.5, the weights 2 then 4 after the two steps: shadow 1 then 0.5 + 2 = 2.5, corrected
    by 1 - 0.5^t: 2, then 2.5 / 0.75 = 10/3 = (0.5 * 2 + 4) / 1.5, the steps' weights alone."""
    w = _param(0.0, -1.0)
    average = WeightAverage([w], 0.5)
    with average.applied():  # no step yet: the weights themselves
        assert w.tolist() == [0.0, -1.0]
    for value, expected in ((2.0, 2.0), (4.0, 10 / 3)):
        with torch.no_grad():
            w.fill_(value)
        average.update()
        assert average.averaged()[0].tolist() == pytest.approx([expected, expected])
    with average.applied():
        assert w.tolist() == pytest.approx([10 / 3, 10 / 3])
    assert w.tolist() == [4.0, 4.0]  # exactly the trained weights again
    with pytest.raises(RuntimeError), average.applied():
        raise RuntimeError("a failed validation")
    assert w.tolist() == [4.0, 4.0]


def test_decay_zero_is_inert():
    w = _param(1.0)
    average = WeightAverage([w], 0.0)
    average.update()
    with torch.no_grad():
        w.fill_(3.0)
    with average.applied():
        assert w.tolist() == [3.0]
    assert not average.active and average.shadow == []
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage([w], 1.0)


def test_a_bf16_weight_is_averaged_in_float32():
    """(1 - d) * w is below bf16's resolution next to the shadow: a bf16 shadow would not move."""
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    average = WeightAverage([w], 0.999)
    for _ in range(3):
        average.update()
    with torch.no_grad():
        w.fill_(2.0)
    average.update()
    # weights 1, 1, 1, 2 with weights d^3 .. d^0: just over 1.25
    expected = (0.999 ** 3 + 0.999 ** 2 + 0.999 + 2) / (0.999 ** 3 + 0.999 ** 2 + 0.999 + 1)
    assert average.averaged()[0].dtype == torch.float32
    assert average.averaged()[0].item() == pytest.approx(expected, rel=1e-6)


def test_the_checkpoint_file_resumes_the_average_only_with_the_same_decay(tmp_path):
    w = _param(1.0, 2.0)
    first = WeightAverage([w], 0.9)
    for _ in range(3):
        first.update()
    first.save(tmp_path / "average.pt")
    resumed = WeightAverage([_param(0.0, 0.0)], 0.9)
    assert resumed.load(tmp_path / "average.pt")
    assert resumed.steps == 3 and resumed.averaged()[0].tolist() == pytest.approx([1.0, 2.0])
    other = WeightAverage([_param(0.0, 0.0)], 0.5)
    assert not other.load(tmp_path / "average.pt") and other.steps == 0
    assert not WeightAverage([w], 0.9).load(tmp_path / "missing.pt")
