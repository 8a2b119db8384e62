"""Mode `score` on stored states (`alro evaluate/compare --reuse-states`): a frozen-LM ranker's
states at the candidate and history lines depend on the frozen weights and the prompt, not on
its score head. So rankers that share the LM (the seeds and loss variants of one recipe, the
rows of an ablation) rank a split on the states the first of them read and stored, in the
training path's store (train/frozen.py, keyed by the weights, the head's layer and lines and the
prompt): each ranker after the first costs its head, not the LM's forward. Each prompt is read
and stored alone: Ray Data groups a split's rows into batches differently from run to run, and a
batch's left padding moves its floats, so a key per batch would seldom be met again.

The scores are those of training's validation (`CachedStates.scores`): within float noise of
`rank_batch`'s (tests/test_score_head.py), and the same for every ranker that reads them.
TPQ then measures reading the stored states for every ranker but the first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from alro_ray.model.loading import cache_root
from alro_ray.rank.ranking import refuse_nonfinite
from alro_ray.train import frozen

log = logging.getLogger("alro_ray")


def store_for(ranker) -> Path | None:
    """The store a ranker's states may be reused from, or None where reuse would be wrong: a
    ranker without a head, or one whose LM was trained (its LoRA A, which the key leaves out,
    then matters)."""
    if ranker.scorer is None or not ranker.config.model.freeze_lm:
        return None
    return cache_root(ranker.config.model.cache_dir) / "frozen-states"


class StoredScores:
    """Mode `score` for one loaded ranker through the states store; the weights are hashed once."""

    def __init__(self, ranker, store: Path):
        self.ranker, self.store = ranker, store
        pad = ranker.tokenizer.pad_token_id
        self.weights = frozen.weights_digest(ranker.model, ranker.scorer, pad, frozen.READ_BATCH)

    def rank(self, prompts: Sequence[Sequence[int]], c: int) -> tuple[list[list[int]], list[list[float]]]:
        """Orders (prompt positions best first) and scores, as `Ranker.rank(prompts, "score")`."""
        r = self.ranker
        parts = []
        for p in prompts:  # one prompt per key: a batch's padding, and so its floats, depends on its company
            # CachedStates rows: the prompt, and labels the scores never read
            row = {"input_ids": list(p), "slot_positions": [len(p)], "candidate_ratings": [0.0] * c,
                   "gold_order": list(range(c))}
            states = frozen.read_states(r.model, r.rank_tokenizer, [row], r.tokenizer.pad_token_id, rank=1,
                                        say=lambda _: None, split="ranked", store=self.store, scorer=r.scorer,
                                        weights=self.weights)
            parts.append(states.scores(r.scorer.head).float().cpu())
        scores = torch.cat(parts)
        refuse_nonfinite(scores, "score")
        return torch.argsort(scores, dim=-1, descending=True, stable=True).tolist(), scores.tolist()
