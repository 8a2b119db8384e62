"""The frozen layers' states below LoRA, read once per sequence (`train.cache_lower_layers`).

With LoRA on the top k decoder layers only (`model.lora.layers: k`) the embeddings and the
n - k layers below never change, so the input of the lowest LoRA layer, hidden_states[n - k],
is a fixed function of each training sequence's tokens. The first step on a sequence reads it
with a no-grad forward that stops there (model/hidden.forward_to_layer) and keeps it; every
later step on that sequence runs the top k layers alone from it (forward_from_layer): a forward
and backward of k layers instead of a forward of all n and a backward of k. After an epoch that
read new states, each worker saves its own under the model cache (frozen-states/, beside the
score head's, which `alro cache --clear-states` frees too), keyed by the frozen weights, the
layer and the prepared data, so the other seeds and recipes of an ablation on the same data read
them back and never run the lower layers.

The states are kept on the CPU in the model's dtype: hidden size x tokens per sequence (SmolLM2's
576 x ~225 tokens in fp32: 0.5 MB a sequence, 0.4 GB for 840 training lists and their permuted
prompts on 2 workers). For a few hundred or thousand lists on a small model, not a large corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alro_ray.model.hidden import hidden_states_at
from alro_ray.model.padding import left_pad

log = logging.getLogger("alro_ray")


def lowest_lora_layer(model) -> int:
    """n - k: the lowest decoder layer with a trained parameter (nothing outside the decoder
    layers may train: a trained embedding would change the states below it)."""
    trained = [(name, re.search(r"\.layers\.(\d+)\.", name)) for name, p in model.named_parameters()
               if p.requires_grad]
    others = [name for name, m in trained if m is None]
    if others:  # e.g. a trained embedding: the lower states would change as it trains
        raise ValueError(f"train.cache_lower_layers: parameters outside the decoder layers train ({others[:3]})")
    if not trained:
        raise ValueError("train.cache_lower_layers: no decoder layer has a trained parameter")
    return min(int(m.group(1)) for _, m in trained)


def weights_key(model, layer: int, data_dir: str | Path) -> str:
    """A hash of what the stored states depend on: the frozen weights (trained ones, LoRA's, left
    out: they sit above `layer`), the layer, dtype, device, the torch and transformers versions,
    and the prepared data's directory (states of other data would only be missed, never wrong,
    since each is keyed by its tokens; this keeps one file per data set)."""
    import transformers

    digest = hashlib.blake2b(digest_size=16)
    p0 = next(model.parameters())
    digest.update(json.dumps([layer, str(p0.dtype), p0.device.type, torch.__version__, transformers.__version__,
                              str(Path(data_dir).resolve())]).encode())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def sequence_key(seq: Sequence[int]) -> str:
    return hashlib.blake2b(np.asarray(seq, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


class LowerStates:
    """hidden_states[layer] of every sequence met so far, by its tokens; `padded` reads the missing ones."""

    def __init__(self, layer: int, key: str = "", path: Path | None = None):
        self.layer, self.key, self.path = layer, key, path
        self.states: dict[str, torch.Tensor] = {}
        self.read = 0  # sequences whose lower layers ran in this process
        self.unsaved = 0
        if path is not None and path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            saved = torch.load(self.path, weights_only=True)
            ok = saved["key"] == self.key and saved["layer"] == self.layer
        except Exception as e:  # a torn or foreign file: read the states again
            saved, ok = None, False
            log.warning("the stored lower-layer states %s are unreadable (%s: %s): reading them again",
                        self.path, type(e).__name__, e)
        if ok:
            self.states = saved["states"]
            try:  # the file's time is its last use (`alro cache --clear-states --older-than`)
                os.utime(self.path)
            except OSError:
                pass

    def padded(self, model, seqs: Sequence[Sequence[int]], pad_id: int, device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [N, T, H], attention mask [N, T]) of `seqs` left-padded, as `left_pad` pads
        their tokens; the lower layers run (no grad, one batch) for the sequences not met before."""
        keys = [sequence_key(s) for s in seqs]
        first_of: dict[str, int] = {}  # each sequence not met before, read once even if it repeats
        for i, k in enumerate(keys):
            if k not in self.states:
                first_of.setdefault(k, i)
        missing = list(first_of.values())
        if missing:
            with torch.no_grad():
                ids, mask = left_pad([seqs[i] for i in missing], pad_id, device)
                h = hidden_states_at(model, self.layer, ids, mask)
            for row, i in enumerate(missing):  # left padding: a row's tokens are its last len(seq) columns
                self.states[keys[i]] = h[row, h.shape[1] - len(seqs[i]):].detach().to("cpu", copy=True)
            self.read += len(missing)
            self.unsaved += len(missing)
        width = max(len(s) for s in seqs)
        first = self.states[keys[0]]
        out = torch.zeros((len(seqs), width, first.shape[-1]), dtype=first.dtype)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (k, s) in enumerate(zip(keys, seqs)):
            out[i, width - len(s):] = self.states[k]
            mask[i, width - len(s):] = 1
        return out.to(device), mask.to(device)

    def save(self) -> bool:
        """Write the states (atomically) if this process read new ones; whether it wrote."""
        if self.path is None or not self.unsaved:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        torch.save({"key": self.key, "layer": self.layer, "states": self.states}, tmp)
        os.replace(tmp, self.path)
        self.unsaved = 0
        return True


def for_worker(model, data_dir: str | Path, store: Path | None, rank: int, world: int) -> LowerStates:
    """The worker's states: those it saved under `store` in an earlier run on the same frozen
    weights, layer and data (its share: the same rows every run, train/shares.py), if any."""
    layer = lowest_lora_layer(model)
    key = weights_key(model, layer, data_dir)
    path = store / f"lower-{key}-{rank}of{world}.pt" if store is not None else None
    return LowerStates(layer, key, path)
