"""train.compile: the in-place compiled model gives the eager model's losses and gradients."""

import copy

import pytest
import torch

from tests.test_objective import _losses, setup  # noqa: F401  (the module-scoped fixture)


@pytest.mark.slow
def test_compiled_model_matches_eager(setup):  # noqa: F811
    """Slow: compiling even the tiny model takes about a minute on 2 cores."""
    cfg, rows, model, tok = setup
    compiled = copy.deepcopy(model)
    compiled.compile(dynamic=True)  # as the trainer does with train.compile
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in compiled.named_parameters()]  # checkpoints keep their keys
    for shared in (True, False):  # the shared-prefix path (KV cache) and two full passes
        a, ga = _losses(setup, shared_prefix=shared)
        b, gb = _losses((cfg, rows, compiled, tok), shared_prefix=shared)
        for name in ("total", "sft", "rank", "perm"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-3), n
