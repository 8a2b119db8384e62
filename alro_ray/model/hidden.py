"""One layer's hidden states without running the layers above it: the frozen-LM training path
(train/frozen.py) reads them once per prompt, and ranking in mode `score` reads the score head's
layer (rank/ranking.py), and training a score head by its own loss (train/objective.py) stops at
it too: a head on layer -24 of SmolLM2's 30 costs a fifth of a full forward. The other way,
`forward_from_layer` runs only the layers above stored states (train/lower_states.py)."""

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


def _decoder(model):
    inner = getattr(model, "module", model)  # a DeepSpeed engine's module
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # under PEFT
    return base.get_decoder()


def forward_to_layer(model, layer: int, **kwargs) -> torch.Tensor:
    """`model(**kwargs).hidden_states[layer]`, running only the layers it needs (a cache in kwargs
    is filled for those layers only). `model` may be a DeepSpeed engine; the layer's output keeps
    its autograd graph, so a score head trained alone backpropagates through it (train/objective.py)."""
    decoder = _decoder(model)
    n = len(decoder.layers)
    k = layer % (n + 1)  # hidden_states[0] is the embeddings, [k] the output of decoder layer k - 1
    if k == n:  # the last layer's states are normed: the whole forward
        return model(**kwargs, logits_to_keep=1, output_hidden_states=True).hidden_states[layer]
    with _catch_output(decoder.embed_tokens if k == 0 else decoder.layers[k - 1]) as caught:
        try:
            model(**kwargs, logits_to_keep=1)
        except _Reached:
            pass
    return caught["states"]


def hidden_states_at(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's `hidden_states[layer]` for a left-padded batch, computing only the layers it
    needs: layer -18 of SmolLM2's 30 runs the first 13. The last layer's (normed) states take the
    whole forward."""
    return forward_to_layer(model, layer, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions(attention_mask), use_cache=False)


def forward_from_layer(model, layer: int, states: torch.Tensor, **kwargs):
    """`model(**kwargs)` from `states` = hidden_states[layer] on: decoder layers `layer` .. n - 1,
    the norm and the LM head run, the embeddings and the layers below do not (the frozen layers'
    states read once, train/lower_states.py). The decoder's layer list is cut for the call and
    put back after it; the layers keep their own layer_idx (a KV cache is not supported: use_cache
    False). `model` may be a DeepSpeed engine or a PEFT model."""
    decoder = _decoder(model)
    layers = decoder.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"forward_from_layer: layer {layer} must be in 0 .. {len(layers) - 1}")
    decoder.layers = layers[layer:]
    try:
        return model(inputs_embeds=states, use_cache=False, **kwargs)
    finally:
        decoder.layers = layers
