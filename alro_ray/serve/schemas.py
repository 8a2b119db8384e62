"""Request and response schemas (pydantic models built from the limits, so /openapi.json shows them)."""

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, model_validator

from alro_ray.serve.settings import MODES, ServeSettings

MAX_ATTRIBUTE_ITEMS = 20  # attributes given as a list: at most this many, each <= max_attribute_chars


def safe_text(value: Any, limit: int = 300) -> str:
    """A string that can always be JSON-encoded as UTF-8 (no lone surrogates), cut to `limit`."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(value: str) -> str:
    """Refuse text that cannot be sent on as UTF-8 (lone surrogates); otherwise unchanged: ids come
    back byte for byte, and item text is cut as training cut it by the ranker (prompts.shown_text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogate code points)") from None
    return value


def _nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return _encodable(value)


def _not_bool(value: Any) -> Any:
    """Integer ids: 7 and 7.0 (JSON Schema integers), never true/false."""
    if isinstance(value, bool):
        raise ValueError("an id must be a string or an integer, not a boolean")
    return value


def make_schemas(settings: ServeSettings, max_candidates: int) -> dict[str, type]:
    s = settings
    Title = Annotated[StrictStr, Field(min_length=1, max_length=s.max_title_chars, pattern=r"\S",
                                       description="item title; the prompt shows it on one line, cut as "
                                                   "the adapter's training data was (data.max_title_chars)"),
                      AfterValidator(_nonblank)]
    AttrStr = Annotated[StrictStr, Field(max_length=s.max_attribute_chars), AfterValidator(_encodable)]
    AttrList = Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=s.max_attribute_chars,
                                                         pattern=r"\S"), AfterValidator(_nonblank)]],
                         Field(max_length=MAX_ATTRIBUTE_ITEMS)]
    Attributes = Annotated[Union[AttrStr, AttrList], Field(
        description='e.g. "Action|Sci-Fi", or ["Action", "Sci-Fi"] (joined with "|"); '
                    f'<= {s.max_attribute_chars} characters in all (a list: once joined)')]
    CandidateId = Union[Annotated[StrictStr, Field(min_length=1, max_length=s.max_id_chars, pattern=r"\S"),
                                  AfterValidator(_nonblank)],
                        Annotated[int, BeforeValidator(_not_bool), Field(ge=-(2 ** 63), le=2 ** 63 - 1)]]
    Rating = Annotated[float, Field(allow_inf_nan=False, ge=-1e6, le=1e6)]

    def joined(attrs) -> str:
        """A list of attributes as one string, under the same limit as a string (never a way round it)."""
        text = attrs if isinstance(attrs, str) else "|".join(attrs)
        if len(text) > s.max_attribute_chars:
            raise ValueError(f"attributes joined with '|' have {len(text)} characters, limit {s.max_attribute_chars}")
        return text

    class Hints(BaseModel):  # data/hints.py VALUE_KEYS; a missing value shows "none"
        model_config = ConfigDict(extra="forbid")
        mean_rating: Optional[Rating] = None
        ratings: Optional[Annotated[int, Field(ge=0)]] = None
        popularity_rank: Optional[Annotated[int, Field(ge=1)]] = None
        mf_score: Optional[Rating] = None

    class HistoryItem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        title: Title
        attributes: Attributes = ""
        rating: Optional[Rating] = Field(None, description="the user's rating; left out of the prompt if null")
        id: Optional[CandidateId] = Field(None, description="catalog id; for a ranker trained with data.hints, "
                                                            "rated history items with ids give MF's user part "
                                                            "(hints mf_score, mf_rank)")

        @model_validator(mode="after")
        def _attrs(self):
            self.attributes = joined(self.attributes)
            return self

    class Candidate(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: CandidateId = Field(description="returned in `ranking`; unique within the request")
        title: Title
        attributes: Attributes = ""
        hints: Optional[Hints] = Field(None, description="prompt hints for a ranker trained with data.hints; "
                                                         "default: computed from its saved fit by `id`")

        @model_validator(mode="after")
        def _attrs(self):
            self.attributes = joined(self.attributes)
            return self

    class Fusion(BaseModel):
        model_config = ConfigDict(extra="forbid")
        classical: Literal["mf", "item-mean"] = Field(
            description="the classical score: MF's predicted rating (hint mf_score) or the item's mean rating "
                        "(hint mean_rating), from each candidate's hints, else the ranker's saved fit by id")
        weight: Optional[float] = Field(
            None, ge=0, le=1, description="the ranker's weight w in w * ranker + (1 - w) * classical; omitted: "
                                          "the adapter's saved weight for this mode and classical model "
                                          "(`alro evaluate --fuse mf --save-fusion`, chosen on the valid split)")
        method: Optional[Literal["score", "borda", "rrf"]] = Field(
            None, description="z-scored scores, Borda points or reciprocal rank (rank/fusion.py); omitted: the "
                              "saved weight's method, else score")

    class RankRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_REQUEST]})
        history: list[HistoryItem] = Field(min_length=1, max_length=s.max_history,
                                           description="items the user interacted with, oldest first")
        candidates: list[Candidate] = Field(
            min_length=2, max_length=max_candidates,
            description="items to rank; at most the adapter's trained candidate count C (GET /adapters)")
        mode: Optional[Literal[MODES]] = Field(
            None, description=f"ranking mode (score: adapters with a score head); default {s.default_mode!r}")
        adapter: Optional[StrictStr] = Field(None, max_length=64,
                                             description=f"adapter name (GET /adapters); default {s.default_name!r}")
        fusion: Optional[Fusion] = Field(None, description="fuse the ranker's scores with a classical model's "
                                                           "(RecRanker's hybrid ranking)")

        @model_validator(mode="after")
        def _unique_ids(self):
            seen: set[str] = set()
            dups = []
            for c in self.candidates:
                key = str(c.id)
                if key in seen:
                    dups.append(key)
                seen.add(key)
            if dups:
                raise ValueError(f"duplicate candidate ids: {sorted(set(dups))[:10]}")
            return self

    class RankResponse(BaseModel):
        ranking: list[Union[str, int]] = Field(description="candidate ids, best first")
        scores: dict[str, float] = Field(
            description="per candidate id: one-pass = log-probability of being ranked first; "
                        "generate = minus the rank; score = the score head's score (higher is better)")
        adapter: str
        mode: str
        fusion: Optional[dict[str, Any]] = Field(None, description="the fusion applied (then `scores` are fused)")
        batch_size: int = Field(description="requests in the server-side batch this one ran in")

    class RatedItem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: CandidateId = Field(description="catalog id (an item the adapter's retriever knows)")
        rating: Optional[Rating] = Field(None, description="the user's rating; left out of the prompt if null")

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user": "196", "k": 10}]})
        user: Optional[CandidateId] = Field(None, description="a user id the adapter's retriever knows: her "
                                                              "rated history is taken from its fit")
        history: Optional[list[RatedItem]] = Field(
            None, min_length=1, max_length=s.max_history, description="or the rated items themselves, oldest first")
        k: Optional[int] = Field(None, ge=1, le=max_candidates,
                                 description="how many to return (at most the adapter's C); default min(10, C)")
        mode: Optional[Literal[MODES]] = Field(None, description=f"ranking mode; default {s.default_mode!r}")
        adapter: Optional[StrictStr] = Field(None, max_length=64,
                                             description=f"adapter name (GET /adapters); default {s.default_name!r}")

        @model_validator(mode="after")
        def _one_source(self):
            if (self.user is None) == (self.history is None):
                raise ValueError("give either `user` (a known user id) or `history` (rated items), not both or neither")
            return self

    class RecommendResponse(BaseModel):
        items: list[Union[str, int]] = Field(description="the k best item ids, best first")
        scores: dict[str, float] = Field(description="the ranker's score of each returned item (higher is better)")
        retrieved: list[str] = Field(description="the C candidates the retriever gave, its best first")
        adapter: str
        mode: str
        batch_size: int = Field(description="requests in the server-side batch this one ran in")

    class ErrorBody(BaseModel):
        error: str = Field(description="what is wrong")
        detail: Optional[list[dict[str, Any]]] = Field(None, description="per-field validation errors")

    return {"HistoryItem": HistoryItem, "Candidate": Candidate, "RankRequest": RankRequest,
            "RankResponse": RankResponse, "RecommendRequest": RecommendRequest,
            "RecommendResponse": RecommendResponse, "ErrorBody": ErrorBody}


EXAMPLE_REQUEST = {
    "history": [
        {"title": "The Matrix (1999)", "attributes": "Action|Sci-Fi", "rating": 5},
        {"title": "Toy Story (1995)", "attributes": "Animation|Children's|Comedy", "rating": 3},
    ],
    "candidates": [
        {"id": "m1", "title": "Alien (1979)", "attributes": "Horror|Sci-Fi"},
        {"id": "m2", "title": "Babe (1995)", "attributes": "Children's|Comedy|Drama"},
        {"id": "m3", "title": "Heat (1995)", "attributes": "Action|Crime|Thriller"},
    ],
    "mode": "generate",
}
