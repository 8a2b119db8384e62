"""The score head (issue 11): one score per candidate, read off the language model's hidden state
at the candidate's line in the single prompt, in one forward pass (docs/method.md, "Score head").

  hidden state   `model.head.layer` of the model's hidden states (-1: the last layer, normed), at
                 each candidate line's last token (`line_end`) or its identifier letter
                 (`identifier`); positions from `RankTokenizer.candidate_positions`
  head           LayerNorm (no affine: hidden states of middle layers have large, uneven scales)
                 then a linear map or a one-hidden-layer MLP to one score
  user match     with `model.head.user: rated_history`, plus (P c).(Q u): the candidate's state c
                 matched against a vector u of the user's history lines (their line-end states,
                 mean and rating-weighted mean; ratings read from the prompt's own text), so
                 the score can depend on the user's taste, which c alone does not carry

In training the head is a submodule of the PEFT model (`score_head`), so DeepSpeed puts its
parameters in the optimizer beside LoRA's and in its checkpoints; the ranker checkpoint keeps it
as head.safetensors with its settings in ranker.json["head"]. At ranking time it is held apart
(`CandidateScorer`): Serve shares one PEFT model among adapters that each have their own head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from alro_ray.config import HeadConfig, ModelConfig, from_dict
from alro_ray.errors import AlroError, ConfigError
from alro_ray.model.ranker_info import RankerInfo

ATTRIBUTE = "score_head"  # the head's name as a submodule of the model being trained
WEIGHTS = "head.safetensors"


@dataclass
class HistoryLines:
    """The history lines of N prompts, padded to the longest history: what the user match reads."""

    positions: torch.Tensor  # [N, L] long: each line's last token (unpadded prompt coordinates; 0 on padding)
    ratings: torch.Tensor  # [N, L] float: the rating the line shows, NaN where it shows none
    mask: torch.Tensor  # [N, L] bool: False on padding

    @classmethod
    def of(cls, lines: Sequence[Sequence[tuple[int, float | None]]]) -> "HistoryLines":
        """From `RankTokenizer.history_lines` of each prompt."""
        width = max((len(x) for x in lines), default=0)
        pos = torch.zeros(len(lines), width, dtype=torch.long)
        ratings = torch.full((len(lines), width), float("nan"))
        mask = torch.zeros(len(lines), width, dtype=torch.bool)
        for b, row in enumerate(lines):
            for j, (p, r) in enumerate(row):
                pos[b, j], mask[b, j] = p, True
                if r is not None:
                    ratings[b, j] = r
        return cls(pos, ratings, mask)


class ScoreHead(nn.Module):
    def __init__(self, hidden_size: int, cfg: HeadConfig):
        super().__init__()
        if cfg.kind not in ("linear", "mlp"):
            raise ConfigError(f"model.head.kind must be linear or mlp for a score head, got {cfg.kind!r}")
        self.cfg, self.hidden_size = cfg, hidden_size
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.net = nn.Linear(hidden_size, 1) if cfg.kind == "linear" else nn.Sequential(
            nn.Linear(hidden_size, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))
        if cfg.user == "rated_history":
            self.match_candidate = nn.Linear(hidden_size, cfg.user_rank, bias=False)  # P
            self.match_user = nn.Linear(2 * hidden_size, cfg.user_rank, bias=False)  # Q

    @property
    def reads_history(self) -> bool:
        return self.cfg.user != "none"

    def forward(self, hidden: torch.Tensor, history_states: torch.Tensor | None = None,
                history: HistoryLines | None = None) -> torch.Tensor:
        """hidden [N, C, H] at the candidate lines -> [N, C] float32 scores (higher = better).
        The user match also needs the states at the history lines [N, L, H] and their ratings."""
        dtype = next(self.parameters()).dtype
        c = self.norm(hidden.to(dtype))
        scores = self.net(c).squeeze(-1)
        if self.reads_history:
            if history_states is None or history is None:
                raise ValueError("model.head.user=rated_history needs the history lines' hidden states")
            u = self.match_user(self.user_vector(history_states, history))  # [N, r]
            scores = scores + (self.match_candidate(c) * u.unsqueeze(1)).sum(-1)
        return scores.float()

    def user_vector(self, states: torch.Tensor, history: HistoryLines) -> torch.Tensor:
        """[N, 2H]: the mean of the normed history states, and their mean weighted by each line's
        rating minus the user's mean shown rating (lines without a rating weigh 0 there)."""
        dtype = next(self.parameters()).dtype
        h = self.norm(states.to(dtype))
        present = history.mask.to(h.device, dtype)
        ratings = history.ratings.to(h.device, dtype)
        rated = present * torch.isfinite(ratings).to(dtype)
        r = torch.nan_to_num(ratings) * rated
        mean_r = r.sum(1, keepdim=True) / rated.sum(1, keepdim=True).clamp(min=1)
        weight = (r - mean_r) * rated
        count = present.sum(1, keepdim=True).clamp(min=1)  # an empty history gives u = 0
        return torch.cat([(present.unsqueeze(-1) * h).sum(1) / count,
                          (weight.unsqueeze(-1) * h).sum(1) / count], dim=-1)

    def describe(self) -> dict:
        """What ranker.json keeps to rebuild the head."""
        c = self.cfg
        return {"kind": c.kind, "position": c.position, "layer": c.layer, "hidden": c.hidden,
                "user": c.user, "user_rank": c.user_rank, "hidden_size": self.hidden_size, "weights": WEIGHTS}


def _model_config(model):
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    return inner.config


def build_head(model, cfg: HeadConfig) -> ScoreHead:
    """A freshly initialised head for `model`, after checking the layer exists."""
    config = _model_config(model)
    layers = config.num_hidden_layers
    if not -(layers + 1) <= cfg.layer <= layers:
        raise ConfigError(f"model.head.layer={cfg.layer}, but the model has {layers} layers: hidden states are "
                          f"indexed {-(layers + 1)}..{layers} (0 = the embeddings, -1 = the last layer)")
    return ScoreHead(config.hidden_size, cfg)


def attach_head(model, cfg: ModelConfig) -> ScoreHead | None:
    """For training: a new head registered on `model` (trainable beside LoRA), or None for
    model.head.kind=none. With model.freeze_lm every other parameter is frozen."""
    if cfg.head.kind == "none":
        return None
    head = build_head(model, cfg.head)
    if cfg.freeze_lm:
        for p in model.parameters():
            p.requires_grad_(False)
    setattr(model, ATTRIBUTE, head.to(next(model.parameters()).device))
    return head


def head_of(model) -> ScoreHead | None:
    """The head registered on `model` (a PEFT model, or the DeepSpeed engine around one)."""
    for m in (model, getattr(model, "module", None)):
        head = getattr(m, ATTRIBUTE, None) if m is not None else None
        if isinstance(head, ScoreHead):
            return head
    return None


def gather_hidden(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [N, T, H] and positions [N, C] (indices into T) -> [N, C, H]."""
    index = positions.to(hidden.device).long().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def save_head(head: ScoreHead, out_dir: Path) -> dict:
    """Write head.safetensors (float32) into a ranker checkpoint; returns ranker.json's entry."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()},
              str(Path(out_dir) / WEIGHTS))
    return head.describe()


class CandidateScorer:
    """A loaded head with the tokenizer that finds the candidate lines: what `rank_batch` needs
    for mode `score`."""

    def __init__(self, head: ScoreHead, rank_tokenizer):
        self.head = head
        self.rank_tokenizer = rank_tokenizer

    @property
    def layer(self) -> int:
        return self.head.cfg.layer

    def positions(self, prompt: Sequence[int], c: int) -> list[int]:
        return self.rank_tokenizer.candidate_positions(prompt, c, self.head.cfg.position)

    def history(self, prompts: Sequence[Sequence[int]], c: int) -> HistoryLines | None:
        """The prompts' history lines when the head reads them, else None."""
        if not self.head.reads_history:
            return None
        return HistoryLines.of([self.rank_tokenizer.history_lines(ids, c) for ids in prompts])

    def states(self, hidden_states: Sequence[torch.Tensor], prompts: Sequence[Sequence[int]], c: int
               ) -> tuple[torch.Tensor, torch.Tensor | None, HistoryLines | None]:
        """What the head reads from a forward's hidden states over the LEFT-padded `prompts`:
        the states at the candidate lines [B, c, H], and at the history lines with those lines
        (None, None when the head reads no history)."""
        hidden = hidden_states[self.layer]
        shift = hidden.shape[1] - torch.tensor([len(ids) for ids in prompts])[:, None]
        cand = gather_hidden(hidden, torch.tensor([self.positions(ids, c) for ids in prompts]) + shift)
        history = self.history(prompts, c)
        if history is None:
            return cand, None, None
        return cand, gather_hidden(hidden, history.positions + shift), history

    def scores(self, hidden_states: Sequence[torch.Tensor], prompts: Sequence[Sequence[int]], c: int) -> torch.Tensor:
        """[B, c] scores from a forward's hidden states over the LEFT-padded `prompts`."""
        return self.head(*self.states(hidden_states, prompts, c))


def load_scorer(path: str | Path, info: RankerInfo, rank_tokenizer, device="cpu", dtype=None) -> CandidateScorer | None:
    """The head of a ranker checkpoint, or None for one without (older checkpoints, kind none)."""
    from safetensors.torch import load_file

    entry = info.head
    if not entry:
        return None
    # user and user_rank came later: checkpoints without them have no user match
    cfg = from_dict(HeadConfig, {k: entry[k] for k in ("kind", "position", "layer", "hidden", "user", "user_rank")
                                 if k in entry})
    head = ScoreHead(int(entry["hidden_size"]), cfg)
    weights = Path(path) / entry.get("weights", WEIGHTS)
    try:
        head.load_state_dict(load_file(str(weights)))
    except Exception as e:  # noqa: BLE001 - missing, truncated or of another shape
        raise AlroError(f"{path}: ranker.json names a score head, but {weights.name} does not load: {e}") from None
    return CandidateScorer(head.to(device=device, dtype=dtype or torch.float32).eval(), rank_tokenizer)


def scorer_of(model, rank_tokenizer) -> CandidateScorer | None:
    """The scorer of the head registered on `model` (training and its validation), or None."""
    head = head_of(model)
    return None if head is None else CandidateScorer(head, rank_tokenizer)
