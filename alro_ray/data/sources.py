"""Read a raw dataset into one shape: interactions (user, item, rating, timestamp) and item metadata.

`read_source` is the one entry point. The readers (readers.py) stream their files line by line
and check every row through a `Reader` (source_data.py): a bad row raises a `DataError` that
starts with `file:line: ` (`on_bad_row="error"`) or is skipped and counted by reason in
`SourceData.bad_rows` (`on_bad_row="skip"`). Ratings are graded and checked against
`data.rating_scale` as they are read (ratings.py). Interactions are returned as read:
duplicates and unknown items are the pipeline's to count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from alro_ray.config import DATASETS, GradingConfig, SyntheticConfig
from alro_ray.data.ratings import RatingRule
from alro_ray.data.readers import READERS
from alro_ray.data.rows import BadRow
from alro_ray.data.source_data import METADATA_PREFIX, Reader, SourceData, interactions_frame, items_frame
from alro_ray.data.synthetic import generate
from alro_ray.errors import DataError

__all__ = ["METADATA_PREFIX", "SourceData", "interactions_frame", "items_frame", "read_source"]


def read_source(dataset: str, data_dir: str | Path | None, on_bad_row: str = "error",
                synthetic: SyntheticConfig | None = None, rating_scale: Sequence[float] = (0.0, 10.0),
                grading: GradingConfig | None = None, allow_negative_timestamps: bool = False) -> SourceData:
    """Read `dataset` from `data_dir` (ignored for "synthetic"), ratings as levels on `rating_scale`;
    a negative timestamp is a bad row unless `allow_negative_timestamps`."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    rule = RatingRule(rating_scale, grading)
    if dataset == "synthetic":
        return _graded(generate(synthetic or SyntheticConfig()), rule)
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} needs a data directory (data.data_dir)")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"data directory for {dataset!r} not found (or not a directory): {directory}")
    return READERS[dataset](directory, Reader(on_bad_row, rule, allow_negative_timestamps))


def _graded(source: SourceData, rule: RatingRule) -> SourceData:
    """Generated ratings through the same rule; they have no file lines, so one off the scale
    is a configuration error whatever `on_bad_row` says."""
    try:
        levels = np.array([rule.level(r) for r in source.interactions["rating"]], dtype=np.float64)
    except BadRow as e:
        raise DataError(f"synthetic data: {e.message} (synthetic ratings are 1 to 5)") from None
    levels, source.grading = rule.finish(levels)
    source.interactions = source.interactions.assign(rating=levels)
    return source
