"""The ranker checkpoint contract: ranker.json (format `alro-ranker-v1`) as a typed record.

Everything that ranks with a checkpoint (evaluate, compare, Serve) reads it through
`read_ranker_info`, which also checks the directory holds the files a ranker needs; the layout
is described in rank/ranker.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alro_ray.config import from_record
from alro_ray.errors import AlroError
from alro_ray.files import write_json

FORMAT = "alro-ranker-v1"
FILE = "ranker.json"
REQUIRED = ("adapter/adapter_config.json", "tokenizer", "config.yaml", FILE)


@dataclass
class RankerInfo:
    """What ranking needs besides the adapter and the tokenizer."""

    base_model: str  # model.name the adapter was trained on
    candidates: int  # C: the identifier letters (and a score head) are for exactly C
    history: int  # H in training (requests may send fewer or more)
    identifier_ids: list[int]  # the C letters' token ids under the saved tokenizer
    domain_plural: str  # prompt wording, e.g. "movies"
    attribute_name: str  # e.g. "genres"
    tokenizer: str  # the tokenizer the data was prepared with
    data_dir: str | None = None  # prepared data it was trained on (evaluate's default)
    head: dict[str, Any] | None = None  # the score head's settings (model/score_head.py); None: no head
    hints: list[str] = field(default_factory=list)  # data.hints it was trained with; []: none
    protocol: str = "rated"  # data.protocol; topn: retriever/ holds the retriever, its ratings and the items
    format: str = FORMAT

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        # Written only when present, as before the type existed: older readers see the same file.
        for key, empty in (("head", None), ("hints", []), ("protocol", "rated")):
            if out[key] == empty:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = FILE) -> "RankerInfo":
        return from_record(cls, data, FORMAT, where, AlroError)


def write_ranker_info(info: RankerInfo, out_dir: str | Path) -> None:
    write_json(Path(out_dir) / FILE, info.to_dict())


def read_ranker_info(path: str | Path) -> RankerInfo:
    """ranker.json of a checkpoint directory, or an error naming what is missing."""
    path = Path(path)
    missing = [r for r in REQUIRED if not (path / r).exists()]
    if missing:
        raise AlroError(f"{path} is not a ranker checkpoint: missing {', '.join(missing)}")
    try:
        data = json.loads((path / FILE).read_text())
    except json.JSONDecodeError as e:
        raise AlroError(f"{path}/{FILE} is not valid JSON ({e})") from None
    return RankerInfo.from_dict(data, f"{path}/{FILE}")
