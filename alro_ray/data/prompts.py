"""The ALRO prompt template (spec §2, paper Figure 2), split where the tokenizer needs it.

A prompt is rendered as three pieces so that training, evaluation and serving all tokenize it
the same way, and so that a prompt and its permuted twin share a token-identical prefix:

  prefix   instruction + history + "[Candidate Items]:" line   (identical for every candidate order)
  suffix   the lettered candidate lines + "### Response:" line
  header   "Given the historical interaction, the ranking result is:"

The response is the header followed by one identifier token per candidate (" B", " A", ...).

Item text is user-supplied (a seller's title, a table's column names, a Serve request), so
`item_text` puts it on one line and neutralises anything that imitates the template's
structure (`neutralise`): training, evaluation and serving all render through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

INSTRUCTION = (
    "Given the user's interaction history, which reveals their items preferences, generate a "
    "preference-based ranking of the provided candidate items, your task is to rank a list of new "
    "candidate {domain_plural}. Your ranking should include all the candidate {domain_plural} "
    "provided, and it should be based solely on the user's preferences, without regard to the "
    "initial order of the candidates."
)
RESPONSE_HEADER = "Given the historical interaction, the ranking result is:"
HISTORY_HEADER = "[User Interaction History]:"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    title: str
    attributes: str = ""  # e.g. "Action|Sci-Fi|War"; "" when the item has none


def format_rating(rating: float) -> str:
    return f"{rating:g}"


# Template markers in user-supplied text, each altered so that it no longer reads as one:
# header runs of '#', the section labels, a candidate label "(A)", the response header, and the
# field labels an item line is made of ("title:", "rating:", "<attribute name>:").
_MARKERS = (r"(?P<hashes>#{3,})"
            r"|\[(?P<section>(?i:candidate items|user interaction history))\]"
            r"|\((?P<letter>[A-Z])\)"
            r"|(?P<header>(?i:ranking result is)):"
            r"|(?<!\w)(?P<label>(?i:{labels})):")
_WHITESPACE = re.compile(r"\s+")
_LETTER = re.compile(r"\([A-Z]\)")


@lru_cache(maxsize=64)
def _marker_pattern(attribute_name: str) -> re.Pattern:
    labels = sorted({"title", "rating", attribute_name.lower()} - {""}, key=len, reverse=True)
    return re.compile(_MARKERS.replace("{labels}", "|".join(map(re.escape, labels))))


def _unmarked(m: re.Match) -> str:
    if m["hashes"]:
        return "#"
    if m["letter"]:
        return f"[{m['letter']}]"
    if m["label"]:
        return m["label"] + " -"
    return m["section"] or m["header"]


def neutralise(text: str, attribute_name: str = "") -> tuple[str, int]:
    """`text` on one line with the template's markers altered, and how many were altered.

    "### Response:" -> "# Response:", "(A)" -> "[A]", "[Candidate Items]:" -> "Candidate Items:",
    "... ranking result is:" loses its colon, "rating: 5" -> "rating - 5". Ordinary text comes
    back unchanged, and so does neutralised text (prepare counts with it, the renderer applies
    it again): passes repeat until one changes nothing, in case an alteration completes another
    marker; each alteration removes a '#', ':', '(' or '[', so the passes end."""
    if "  " in text or not text.isprintable():  # cheap: any whitespace but single spaces is caught
        text = _WHITESPACE.sub(" ", text)
    if not ("###" in text or "[" in text or ":" in text or ("(" in text and _LETTER.search(text))):
        return text, 0  # no marker can be there: the common case, many times faster than the pattern
    pattern, count = _marker_pattern(attribute_name), 0
    while True:
        text, n = pattern.subn(_unmarked, text)
        if not n:
            return text, count
        count += n


@lru_cache(maxsize=64)
def _shown_name(attribute_name: str) -> str:
    return neutralise(attribute_name)[0]


class ShownText(NamedTuple):
    text: str
    neutralised: int  # template markers altered
    cut: bool  # it was longer than the limit


def shown_text(text: str, limit: int, attribute_name: str = "") -> ShownText:
    """User-supplied item text as prompts show it, the one cut training and serving share
    (prepare's item table with `data.max_title_chars` / `data.max_attribute_chars`, and Serve
    with the adapter's training config): on one line, the template's markers neutralised,
    stripped, then cut to `limit` characters."""
    text, n = neutralise(text, _shown_name(attribute_name))
    text = text.strip()
    return ShownText(text[:limit], n, len(text) > limit)


def item_text(item: Item, attribute_name: str) -> str:
    name = _shown_name(attribute_name)
    text = f"title: {neutralise(item.title, name)[0]}"
    if item.attributes:
        text += f" {name}: {neutralise(item.attributes, name)[0]}"
    return text


def render_prefix(history: Sequence[tuple[Item, float | None]], domain_plural: str, attribute_name: str) -> str:
    """Instruction and history; a history rating of None is left out (serving may not know it)."""
    lines = []
    for item, rating in history:
        line = item_text(item, attribute_name)
        if rating is not None:
            line += f" rating: {format_rating(rating)}"
        lines.append(line + "\n")
    return (
        "### Instruction:\n"
        + INSTRUCTION.format(domain_plural=domain_plural)
        + "\n\n### Input:\n" + HISTORY_HEADER + "\n"
        + "".join(lines)
        + "[Candidate Items]:\n"
    )


def render_suffix(candidates: Sequence[Item], attribute_name: str, notes: Sequence[str] | None = None) -> str:
    """Candidates in the order given, lettered A, B, C, ...; notes[j] (hints, `data/hints.py`: our
    own text, not neutralised) ends candidate j's line. No notes: the spec's lines exactly."""
    lines = []
    for j, item in enumerate(candidates):
        note = notes[j] if notes else ""
        lines.append(f"({LETTERS[j]}) {item_text(item, attribute_name)}{' ' + note if note else ''}\n")
    return "".join(lines) + "### Response:\n"


def render_response(order: Sequence[int]) -> str:
    """The gold response for candidates listed best first by their prompt positions."""
    return RESPONSE_HEADER + "".join(f" {LETTERS[j]}" for j in order)


class SampleRenderer:
    """Renders a prepared sample's prompt pieces from its item ids, in any candidate order.

    `items` maps item id -> (title, attributes) exactly as rendered at prepare time (titles cut
    to length), so evaluation can re-render a stored sample with its candidates permuted.
    """

    def __init__(self, items: dict[str, tuple[str, str]], attribute_name: str, domain_plural: str,
                 hints=None):
        self.items = items
        self.attribute_name = attribute_name
        self.domain_plural = domain_plural
        self.hints = hints  # anything with notes(row) (`hints.HintModel`, `hints.RowHints`), or None

    def item(self, item_id: str) -> Item:
        title, attributes = self.items[item_id]
        return Item(title, attributes)

    def notes(self, row: dict) -> list[str] | None:
        """The row's hint text per candidate: as prepare stored it (`candidate_notes`), else
        computed by the hints (how prepare computes it, and data prepared before the notes were
        stored), else None (no hints)."""
        if self.hints is None:
            return None
        return list(row.get("candidate_notes") or []) or self.hints.notes(row)

    def prefix(self, row: dict) -> str:
        history = [(self.item(i), float(r)) for i, r in zip(row["history_items"], row["history_ratings"])]
        return render_prefix(history, self.domain_plural, self.attribute_name)

    def suffix(self, row: dict, perm: Sequence[int] | None = None) -> str:
        """Candidates in prompt order, or shown as perm[j] = original position at position j."""
        ids = list(row["candidate_ids"])
        order = range(len(ids)) if perm is None else perm
        notes = self.notes(row)
        return render_suffix([self.item(ids[i]) for i in order], self.attribute_name,
                             [notes[i] for i in order] if notes else None)
