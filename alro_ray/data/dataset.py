"""The prepared-data contract: what `alro prepare` writes and every later stage reads.

  DIR/stats.json                 `PreparedStats` (format `alro-prepared-v1`): counts in = out +
                                 dropped by reason, C, H, the tokenizer and its identifier ids
  DIR/{train,valid,test}/*.parquet  one row per sample, `ROW_SCHEMA` (`SAMPLE_SCHEMA` + prompt)
  DIR/items.parquet              item id -> shown title and attributes
  DIR/fit_interactions.parquet   what baselines and hints may fit on
  DIR/hints.parquet              the fitted prompt hints for held-out rows (only with `data.hints`)
  DIR/hints_train-<k>.parquet    ... and for training rows, one per fold (data/hints.py: cross-fitted)
  DIR/config.yaml                the config that wrote it

Readers import this module, not the pipeline (`prepare`), which pulls in Ray.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alro_ray.config import from_record
from alro_ray.data import hints as prompt_hints
from alro_ray.data.prompts import SampleRenderer
from alro_ray.errors import DataError
from alro_ray.files import write_json

FORMAT = "alro-prepared-v1"

_LIST_I32 = pa.list_(pa.int32())
SAMPLE_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("split", pa.string()),
        ("window", pa.int32()),
        ("history_items", pa.list_(pa.string())),
        ("history_ratings", pa.list_(pa.float64())),
        ("candidate_ids", pa.list_(pa.string())),
        ("candidate_ratings", pa.list_(pa.float64())),
        ("candidate_timestamps", pa.list_(pa.int64())),
        ("gold_order", _LIST_I32),
        ("perm_orders", pa.list_(_LIST_I32)),
        # The list's whole held-out set, the ideal of end-to-end NDCG (rank/metrics.py): the
        # candidates themselves under data.protocol rated, the window's positives under topn,
        # retrieved or not. Older prepared directories lack the three: `read_split_table` fills them.
        ("target_items", pa.list_(pa.string())),
        ("target_ratings", pa.list_(pa.float64())),
        ("retriever_scores", pa.list_(pa.float64())),  # topn: the retriever's score of each candidate
    ]
)
ROW_SCHEMA = pa.schema(
    list(SAMPLE_SCHEMA)
    + [
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("input_ids", _LIST_I32),
        ("labels_mask", pa.list_(pa.int8())),
        ("slot_positions", _LIST_I32),
        ("prefix_len", pa.int32()),
        ("n_prompt_tokens", pa.int32()),
        ("perm_input_ids", pa.list_(_LIST_I32)),
        ("perm_slot_positions", pa.list_(_LIST_I32)),
        ("candidate_notes", pa.list_(pa.string())),  # data.hints text per candidate; [] without hints
    ]
)


@dataclass
class PreparedStats:
    """stats.json. Counts are kept so that nothing disappears silently: interactions read = used +
    dropped (by reason), users read = kept + dropped (by reason)."""

    dataset: str
    files: list[str]
    interactions_read: int
    interactions_used: int
    interactions_dropped: dict[str, int]
    users_read: int
    users_kept: int
    users_dropped: dict[str, int]
    users_per_split: dict[str, int]
    rows: dict[str, int]  # samples per split
    history: int  # H
    candidates: int  # C
    tokenizer: str
    identifier_ids: list[int]  # the C identifier letters' token ids under `tokenizer`
    domain_plural: str
    attribute_name: str
    config: dict[str, Any]  # the whole config that prepared the data (`to_dict`)
    mean_prompt_tokens: dict[str, float] = field(default_factory=dict)
    metadata_rows_skipped: dict[str, int] = field(default_factory=dict)
    hints: list[str] = field(default_factory=list)  # data.hints; [] = none
    hint_interactions: int | None = None  # interactions the held-out rows' hints were fitted on
    hint_folds: int = 1  # data.hint_folds: the training users' folds
    hint_train_interactions: int | None = None  # and the training rows' (mean over the folds)
    hint_tokens_per_prompt: float | None = None
    titles_truncated: int = 0
    titles_neutralised: int = 0
    attributes_neutralised: int = 0
    rating_scale: list[float] = field(default_factory=list)
    grading: dict[str, Any] = field(default_factory=dict)
    ratings_used: dict[str, int] = field(default_factory=dict)
    # data.protocol; under topn (data/retrieval.py) also the held-out ratings per window, the
    # retriever chosen and every setting's valid recall, the user sampling, each split's candidate
    # recall (retrieved positives / held-out positives) and lists with a retrieved positive.
    protocol: str = "rated"
    holdout: int | None = None
    retrieval: dict[str, Any] = field(default_factory=dict)
    user_sampling: dict[str, Any] = field(default_factory=dict)
    candidate_recall: dict[str, float] = field(default_factory=dict)
    lists_with_a_positive: dict[str, int] = field(default_factory=dict)
    lists_dropped: dict[str, int] = field(default_factory=dict)  # windows in = lists out + dropped (topn)
    seconds: float = 0.0
    format: str = FORMAT

    @property
    def permutations(self) -> int:
        """Permuted candidate orders drawn per sample (what beta > 0 needs)."""
        return int(self.config["data"]["permutations"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "stats.json") -> "PreparedStats":
        return from_record(cls, data, FORMAT, where, DataError, fix="re-run `alro prepare`")


def read_stats(data_dir: str | Path) -> PreparedStats:
    path = Path(data_dir) / "stats.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a directory written by `alro prepare` (no stats.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `alro prepare`") from None
    return PreparedStats.from_dict(data, str(path))


def write_stats(stats: PreparedStats, data_dir: str | Path) -> None:
    write_json(Path(data_dir) / "stats.json", stats.to_dict())


def read_split_table(data_dir: str | Path, split: str) -> pa.Table:
    """One split's rows (`ROW_SCHEMA`), its files in name order; empty with the schema if it has none."""
    files = sorted((Path(data_dir) / split).glob("*.parquet"))
    if not files:
        return ROW_SCHEMA.empty_table()
    return with_targets(pa.concat_tables([pq.read_table(f) for f in files], promote_options="default"))


def with_targets(table: pa.Table) -> pa.Table:
    """Rows of a directory prepared before the top-N protocol: the candidates are the targets and
    there is no retriever."""
    if "target_ratings" in table.column_names:
        return table
    return (table.append_column("target_items", table["candidate_ids"])
            .append_column("target_ratings", table["candidate_ratings"])
            .append_column("retriever_scores", pa.array([[]] * len(table), pa.list_(pa.float64()))))


def read_split(data_dir: str | Path, split: str) -> pd.DataFrame:
    """`read_split_table` as a DataFrame."""
    return read_split_table(data_dir, split).to_pandas()


def load_renderer(data_dir: str | Path) -> SampleRenderer:
    """The renderer a prepared directory's prompts were made with."""
    stats = read_stats(data_dir)
    t = pq.read_table(Path(data_dir) / "items.parquet").to_pydict()
    items = dict(zip(t["item"], zip(t["title"], t["attributes"])))
    hints = prompt_hints.HintModel.load(Path(data_dir) / prompt_hints.FILE) if stats.hints else None
    return SampleRenderer(items, stats.attribute_name, stats.domain_plural, hints)


def ranking_stats(candidates: int, history: int, identifier_ids: list[int], tokenizer: str,
                  domain_plural: str = "items", attribute_name: str = "genres", **counts) -> PreparedStats:
    """The stats of a ranker made without prepared data (benchmarks, tests): what `save_ranker`
    and the compatibility check read, with every count zero unless given."""
    zero = {"dataset": "none", "files": [], "interactions_read": 0, "interactions_used": 0,
            "interactions_dropped": {}, "users_read": 0, "users_kept": 0, "users_dropped": {},
            "users_per_split": {}, "rows": {}, "config": {"data": {"permutations": 0}}}
    return PreparedStats(**{**zero, **counts}, history=history, candidates=candidates, tokenizer=tokenizer,
                         identifier_ids=list(identifier_ids), domain_plural=domain_plural,
                         attribute_name=attribute_name)
