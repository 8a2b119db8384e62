"""One layer's hidden states without running the layers above it: the frozen-LM training path
(train/frozen.py) reads them once per prompt, and ranking in mode `score` reads the score head's
layer (rank/ranking.py): a head on layer -24 of SmolLM2's 30 costs a fifth of a full forward."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from alro_ray.model.padding import positions


class _Reached(Exception):
    """Raised by the hook that caught the wanted layer's output: the layers above it need not run."""


@contextmanager
def _catch_output(module):
    caught: dict = {}

    def hook(_module, _inputs, output):
        caught["states"] = output[0] if isinstance(output, tuple) else output
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def hidden_states_at(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's `hidden_states[layer]` for a left-padded batch, computing only the layers it
    needs: layer -18 of SmolLM2's 30 runs the first 13. The last layer's (normed) states take the
    whole forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT
    decoder = base.get_decoder()
    n = len(decoder.layers)
    k = layer % (n + 1)  # hidden_states[0] is the embeddings, [k] the output of decoder layer k - 1
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                  use_cache=False)
    if k == n:
        return model(**kwargs, logits_to_keep=1, output_hidden_states=True).hidden_states[layer]
    with _catch_output(decoder.embed_tokens if k == 0 else decoder.layers[k - 1]) as caught:
        try:
            model(**kwargs, logits_to_keep=1)
        except _Reached:
            pass
    return caught["states"]
