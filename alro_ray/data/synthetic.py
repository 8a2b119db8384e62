"""The embedded default dataset: movies with genres, users with planted genre tastes.

Each user loves two genres and dislikes two (fewer when there are few genres), or, with
`taste_groups` N > 0, takes one of N shared taste profiles (N = 1: everyone likes the same
genres, the easiest signal to learn: no personalisation needed); a rating is
3 + taste x (the item's genres) + a small item quality + noise, rounded and clipped to 1..5.
Taste dominates quality, so a ranker that reads the user's history beats the item-popularity
and item-mean-rating orders by a clear margin. Same config, same data.
"""

from __future__ import annotations

import numpy as np

from alro_ray.config import SyntheticConfig
from alro_ray.errors import ConfigError
from alro_ray.data.source_data import SourceData, interactions_frame, items_frame

GENRES = (
    "Noir", "Space Opera", "Western", "Romance", "Heist", "Horror", "Musical", "Documentary",
    "Fantasy", "Comedy", "War", "Mystery", "Animation", "Thriller", "Sports", "Cyberpunk",
)
ADJECTIVES = (
    "Silent", "Neon", "Broken", "Golden", "Hidden", "Crimson", "Distant", "Frozen", "Wild", "Last",
    "Hollow", "Electric", "Quiet", "Burning", "Velvet", "Iron", "Lonely", "Midnight", "Paper",
    "Secret", "Shattered", "Wandering", "Bitter", "Endless", "Lucky",
)
NOUNS = (
    "Harbor", "Orchard", "Empire", "Garden", "Signal", "Horizon", "Lantern", "River", "Kingdom",
    "Mirror", "Station", "Canyon", "Circus", "Frontier", "Voyage", "Letter", "Machine", "Island",
    "Carnival", "Winter", "Detective", "Symphony", "Comet", "Fortress", "Highway",
)
SEQUELS = ("", " II", " III", " IV", " V", " VI", " VII", " VIII", " IX", " X")
TASTE_SCALE = 1.8  # rating points between a neutral item and one wholly in a loved genre
QUALITY_STD = 0.25  # item quality spread, well under the taste scale
START = 946_684_800  # 2000-01-01, the earliest first rating
SELECTION_BIAS = 0.5  # users pick loved genres a bit more often, as people do


def generate(cfg: SyntheticConfig) -> SourceData:
    _validate(cfg)
    rng = np.random.default_rng(cfg.seed)
    genre_names = _genre_names(cfg.genres)
    membership = _item_genres(rng, cfg.items, cfg.genres)  # items x genres, rows sum to 1
    quality = rng.normal(0.0, QUALITY_STD, cfg.items)
    titles = unique_titles(rng, cfg.items)

    profiles = [_taste(np.random.default_rng([cfg.seed, g]), cfg.genres) for g in range(cfg.taste_groups)]
    users, items, ratings, stamps = [], [], [], []
    for u in range(cfg.users):
        taste = profiles[u % len(profiles)] if profiles else _taste(rng, cfg.genres)
        affinity = membership @ taste  # in [-1, 1] per item
        count = int(rng.integers(cfg.min_interactions, min(cfg.max_interactions, cfg.items) + 1))
        weights = np.exp(SELECTION_BIAS * affinity)
        chosen = rng.choice(cfg.items, size=count, replace=False, p=weights / weights.sum())
        score = 3.0 + TASTE_SCALE * affinity[chosen] + quality[chosen] + rng.normal(0, cfg.noise, count)
        ratings.append(np.clip(np.rint(score), 1, 5))
        gaps = rng.integers(60, 3 * 86_400, count)  # >= 60 s: strictly increasing per user
        stamps.append(START + int(rng.integers(0, 365 * 86_400)) + np.cumsum(gaps))
        users.extend([f"u{u + 1}"] * count)
        items.extend(f"i{i + 1}" for i in chosen)

    attributes = ["|".join(genre_names[g] for g in np.flatnonzero(row)) for row in membership]
    return SourceData(
        interactions=interactions_frame(users, items, np.concatenate(ratings), np.concatenate(stamps)),
        items=items_frame([f"i{i + 1}" for i in range(cfg.items)], titles, attributes),
        attribute_name="genres",
        domain_plural="movies",
        rows_read=len(users),
        bad_rows={},
        files=[],
    )


def _validate(cfg: SyntheticConfig) -> None:
    if min(cfg.users, cfg.items, cfg.genres, cfg.min_interactions) < 1:
        raise ConfigError("data.synthetic.users, items, genres and min_interactions must be >= 1")
    if cfg.max_interactions < cfg.min_interactions:
        raise ConfigError("data.synthetic.max_interactions must be >= min_interactions")
    if cfg.taste_groups < 0:
        raise ConfigError(f"data.synthetic.taste_groups must be >= 0, got {cfg.taste_groups}")
    if cfg.noise < 0:
        raise ConfigError(f"data.synthetic.noise must be >= 0, got {cfg.noise}")


def _genre_names(n: int) -> list[str]:
    """Real-looking names; past the list, numbered variants ("Noir 2") keep them distinct."""
    return [GENRES[g % len(GENRES)] + (f" {g // len(GENRES) + 1}" if g >= len(GENRES) else "")
            for g in range(n)]


def _item_genres(rng: np.random.Generator, items: int, genres: int) -> np.ndarray:
    """Each item in one or two genres, weights normalised so affinity stays in [-1, 1]."""
    membership = np.zeros((items, genres))
    for i in range(items):
        k = 1 if genres == 1 or rng.random() < 0.5 else 2
        membership[i, rng.choice(genres, size=k, replace=False)] = 1.0 / k
    return membership


def _taste(rng: np.random.Generator, genres: int) -> np.ndarray:
    """+1 for up to two loved genres, -1 for up to two disliked, 0 for the rest."""
    loved = min(2, max(1, genres // 2))
    disliked = min(2, genres // 2)
    order = rng.permutation(genres)
    taste = np.zeros(genres)
    taste[order[:loved]] = 1.0
    taste[order[loved:loved + disliked]] = -1.0
    return taste


def unique_titles(rng: np.random.Generator, n: int) -> list[str]:
    """Unique titles: shuffled adjective-noun pairs (some with "The"), then sequels."""
    pairs = [f"{a} {b}" for a in ADJECTIVES for b in NOUNS]
    order = rng.permutation(len(pairs))
    articles = np.where(rng.random(n) < 0.4, "The ", "")
    return [articles[i] + pairs[order[i % len(pairs)]] + _sequel(i // len(pairs)) for i in range(n)]


def _sequel(k: int) -> str:
    return SEQUELS[k] if k < len(SEQUELS) else f" {k + 1}"
