"""The `data` section: which interaction log, how samples are cut, rated and rendered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alro_ray.errors import ConfigError

DATASETS = ("synthetic", "movielens-100k", "movielens-1m", "amazon", "table")
# Identifiers are the letters A, B, C, ... so a list holds at most 26 candidates.
MAX_CANDIDATES = 26
# Relevance feeds gains 2^r - 1, summed in float32: 100 keeps them (and their sums) finite.
MAX_RATING = 100
# The prompt hints `data.hints` may name (rendered by data/hints.py); the retriever's need the
# top-N protocol (its score and rank of each candidate).
HINTS = ("item_mean", "popularity_rank", "mf_score", "mf_rank", "knn_score", "knn_rank", "retriever_score",
         "retriever_rank")
RETRIEVER_HINTS = ("retriever_score", "retriever_rank")


@dataclass
class SyntheticConfig:
    """The embedded default dataset: users with latent genre tastes (see `synthetic.py`)."""

    users: int = 400
    items: int = 240
    genres: int = 8
    min_interactions: int = 50  # every user fits the default H + C = 45
    max_interactions: int = 80
    noise: float = 0.4  # std of the rating noise, in rating points
    taste_groups: int = 0  # 0: every user has own tastes; N: users share N taste profiles
    seed: int = 0


@dataclass
class GradingConfig:
    """Raw values that are not ratings (play or purchase counts) made levels 0..N-1 (`ratings.py`)."""

    method: Literal["none", "bins", "quantiles"] = "none"
    bins: list[float] = field(default_factory=list)  # bins: ascending edges; level = edges the value exceeds
    levels: int | None = None  # quantiles: N levels, the edges are the values' inner N-quantiles

    def validate(self) -> None:
        if self.method == "bins":
            if not self.bins or any(not a < b for a, b in zip(self.bins, self.bins[1:])):
                raise ConfigError(f"data.grading.bins must be a non-empty, strictly ascending list of "
                                  f"edges for method 'bins', got {self.bins}")
        elif self.bins:
            raise ConfigError(f"data.grading.bins is set but data.grading.method is {self.method!r} (use 'bins')")
        if self.method == "quantiles":
            if self.levels is None or self.levels < 2:
                raise ConfigError(f"data.grading.levels must be >= 2 for method 'quantiles', got {self.levels}")
        elif self.levels is not None:
            raise ConfigError(f"data.grading.levels is set but data.grading.method is {self.method!r} "
                              "(use 'quantiles'; with 'bins' the levels are len(bins) + 1)")

    def top_level(self) -> int | None:
        """The highest level grading gives (None: no grading, ratings are used as read)."""
        return {"bins": len(self.bins), "quantiles": (self.levels or 0) - 1}.get(self.method)


@dataclass
class RetrievalConfig:
    """The top-N protocol's retrievers (classical/retrievers.py): every setting below is fitted on
    the training ratings and scored by recall@C of the valid lists; the best one retrieves."""

    retrievers: list[str] = field(default_factory=lambda: ["ease", "als", "popularity"])
    ease_reg: list[float] = field(default_factory=lambda: [50.0, 200.0, 500.0])  # EASE's λ
    als_factors: list[int] = field(default_factory=lambda: [32, 64])
    als_reg: list[float] = field(default_factory=lambda: [0.1])
    als_iterations: int = 15
    folds: int = 5  # training users' folds: a training list's candidates come from a fit without its fold
    select_users: int = 2000  # valid lists the choice is scored on (a seeded sample beyond that)

    def validate(self) -> None:
        unknown = [r for r in self.retrievers if r not in ("ease", "als", "popularity")]
        if not self.retrievers or unknown:
            raise ConfigError(f"data.retrieval.retrievers must name some of ease, als, popularity, got {self.retrievers}")
        if "ease" in self.retrievers and (not self.ease_reg or min(self.ease_reg) <= 0):
            raise ConfigError(f"data.retrieval.ease_reg must be positive values, got {self.ease_reg}")
        if "als" in self.retrievers and (not self.als_factors or min(self.als_factors) < 1 or not self.als_reg
                                         or min(self.als_reg) < 0 or self.als_iterations < 1):
            raise ConfigError("data.retrieval.als_factors must be >= 1, als_reg >= 0 and als_iterations >= 1")
        if self.folds < 1 or self.select_users < 1:
            raise ConfigError("data.retrieval.folds and data.retrieval.select_users must be >= 1")


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "movielens-100k", "movielens-1m", "amazon", "table"] = "synthetic"
    data_dir: str | None = None  # raw files; not used by `synthetic`
    prepared: str | None = None  # a directory written by `alro prepare`; set, nothing is prepared
    history: int = 20  # H
    candidates: int = 25  # C
    windows_per_user: int = 1  # >1: earlier non-overlapping windows too, training users only
    permutations: int = 1  # K permuted prompts per training row (permutation-sensitive loss)
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    allow_negative_timestamps: bool = False  # before 1970; else such a row is bad (usually a broken export)
    # [min, max] relevance levels; a rating outside is a bad row. Gains are 2^r - 1, so min >= 0.
    rating_scale: list[float] = field(default_factory=lambda: [0.0, 10.0])
    grading: GradingConfig = field(default_factory=GradingConfig)  # raw value -> level, before the scale
    domain_plural: str | None = None  # "movies", "CDs", ...; None: the dataset's own word
    max_title_chars: int = 120  # longer titles are cut (counted in stats)
    max_attribute_chars: int = 80  # 0: no attributes in the prompt
    tokenize_actors: int = 1  # Ray Data actors that render and tokenize
    # Prompt hints on each candidate line (data/hints.py): any of item_mean, popularity_rank,
    # mf_score, mf_rank, in the order shown; [] (default): the spec's prompts, byte for byte.
    hints: list[str] = field(default_factory=list)
    # Training rows are shown hints fitted without their own candidate windows: 1 = one fit
    # without every training window; K > 1 = the training users in K folds, each row shown
    # the fit without its fold's windows (nearer the held-out rows' fit; K fits).
    hint_folds: int = 1
    # rated: rank the C items a user rated next (the paper). topn: rank a retriever's top C from the
    # whole catalogue, the last `holdout` ratings held out (data/topn.py, docs/method.md).
    protocol: Literal["rated", "topn"] = "rated"
    holdout: int = 10  # topn: ratings per valid and test window (and per training window's positives)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    # topn: which users' training lists are kept (data/sampling.py): all, or `sampled_users` of them
    # drawn uniformly (the fixed-budget reference), by activity with a penalty for repeats
    # (importance) or across clusters (cluster).
    user_sampling: Literal["all", "uniform", "importance", "cluster"] = "all"
    sampled_users: int = 0  # 0: all (only with user_sampling all)
    sampling_penalty: float = 0.1  # importance: a drawn user's weight is multiplied by this
    sampling_clusters: int = 10  # cluster: k-means clusters of the users' interaction embeddings
    keep_empty_train_lists: bool = False  # topn: training lists without a retrieved positive
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        if self.history < 1:
            raise ConfigError(f"data.history must be >= 1, got {self.history}")
        if self.max_title_chars < 1:
            raise ConfigError(f"data.max_title_chars must be >= 1, got {self.max_title_chars}")
        if self.max_attribute_chars < 0:
            raise ConfigError(f"data.max_attribute_chars must be >= 0 (0: no attributes), got {self.max_attribute_chars}")
        if not 2 <= self.candidates <= MAX_CANDIDATES:
            raise ConfigError(
                f"data.candidates must be between 2 and {MAX_CANDIDATES} (one letter A-Z per "
                f"candidate), got {self.candidates}"
            )
        if min(self.windows_per_user, self.tokenize_actors, self.hint_folds) < 1 or self.permutations < 0:
            raise ConfigError("data.windows_per_user, data.tokenize_actors and data.hint_folds must be >= 1, "
                              "data.permutations >= 0")
        if len(self.split) != 3 or any(s < 0 for s in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"data.split must be three non-negative shares summing to 1, got {self.split}")
        if self.dataset != "synthetic" and self.data_dir is None and self.prepared is None:
            raise ConfigError(f"data.data_dir is required for dataset {self.dataset!r}")
        if any(h not in HINTS for h in self.hints) or len(set(self.hints)) != len(self.hints):
            raise ConfigError(f"data.hints must be distinct names from {list(HINTS)}, got {self.hints}")
        self._validate_ratings()
        self._validate_protocol()

    def _validate_protocol(self) -> None:
        if self.protocol == "rated":
            if set(self.hints) & set(RETRIEVER_HINTS):
                raise ConfigError(f"data.hints {sorted(set(self.hints) & set(RETRIEVER_HINTS))} need a retriever: "
                                  "data.protocol topn")
            if self.user_sampling != "all":
                raise ConfigError("data.user_sampling applies to the top-N protocol's training lists: data.protocol topn")
            return
        if self.holdout < 1:
            raise ConfigError(f"data.holdout must be >= 1, got {self.holdout}")
        self.retrieval.validate()
        if (self.user_sampling == "all") != (self.sampled_users == 0) or self.sampled_users < 0:
            raise ConfigError(f"data.sampled_users must be > 0 with data.user_sampling {self.user_sampling!r} "
                              f"and 0 with 'all', got {self.sampled_users}")
        if not 0 < self.sampling_penalty <= 1 or self.sampling_clusters < 1:
            raise ConfigError("data.sampling_penalty must be in (0, 1] and data.sampling_clusters >= 1")

    def _validate_ratings(self) -> None:
        scale = self.rating_scale
        if len(scale) != 2 or not 0 <= scale[0] < scale[1] < float("inf"):
            raise ConfigError(
                f"data.rating_scale must be [min, max] with 0 <= min < max (relevance feeds gains "
                f"2^r - 1, which need r >= 0), got {scale}")
        if scale[1] > MAX_RATING:
            raise ConfigError(f"data.rating_scale max must be <= {MAX_RATING} (gains 2^r - 1 overflow "
                              f"float32 near r = 127), got {scale[1]}; grade large values with data.grading")
        self.grading.validate()
        top = self.grading.top_level()
        if top is not None and not scale[0] <= 0 < top <= scale[1]:
            raise ConfigError(f"data.grading gives levels 0..{top}; data.rating_scale {scale} must "
                              f"cover them (e.g. data.rating_scale=[0, {top}])")
