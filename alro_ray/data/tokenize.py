"""Token ids of prompts and gold responses, with the positions the losses need.

Pieces are tokenized separately and concatenated (prefix | suffix | header | letters | eos) so
that (a) a prompt and its permuted twin share a token-identical prefix, and (b) every identifier
is exactly one known token at a known position. Training, evaluation and serving all go through
`RankTokenizer`, so they see the same ids.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Sequence

from alro_ray.errors import ConfigError
from alro_ray.data.prompts import HISTORY_HEADER, LETTERS, RESPONSE_HEADER

# A history line ends with " rating: <number>" when the rating is shown (prompts.render_prefix);
# item text cannot hold "rating:" (prompts.neutralise alters it), so this is the template's own.
_RATING = re.compile(r" rating: ([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)$")


def identifier_token_ids(tokenizer, candidates: int) -> list[int]:
    """Token id of " A", " B", ... as they appear in the response; each must be one token."""
    ids = []
    for letter in LETTERS[:candidates]:
        piece = tokenizer.encode(" " + letter, add_special_tokens=False)
        if len(piece) != 1:
            raise ConfigError(
                f"the tokenizer splits the identifier {' ' + letter!r} into {len(piece)} tokens "
                f"{piece}; ALRO needs each identifier to be a single token"
            )
        ids.append(piece[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"the tokenizer maps two identifiers to the same token: {ids}")
    return ids


@dataclass
class Encoded:
    input_ids: list[int]
    labels_mask: list[int]  # 1 on response tokens (header, letters, eos)
    slot_positions: list[int]  # index in input_ids of the k-th identifier of the response
    prefix_len: int  # tokens shared with every other candidate order of the same sample


class RankTokenizer:
    def __init__(self, tokenizer, candidates: int):
        self.tokenizer = tokenizer
        self.candidates = candidates
        self.identifier_ids = identifier_token_ids(tokenizer, candidates)
        self.header_ids = tokenizer.encode(RESPONSE_HEADER, add_special_tokens=False)
        self.eos_id = tokenizer.eos_token_id

    @cached_property
    def _texts(self) -> list[str]:
        """Every token's text; built on first use (about 0.2 s for a 49k vocabulary)."""
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])

    def candidate_positions(self, ids: Sequence[int], c: int, where: str = "line_end") -> list[int]:
        """Index in `ids` of each of the c candidate lines' last token (`line_end`, the token holding
        its newline) or of its identifier letter (`identifier`), in prompt order.

        Read from the end, so `ids` may be a prompt, a prompt with its response, or a few-shot
        prompt: after the candidate lines come only the "### Response:" line and the response
        (neither holds another newline), and before them the "[Candidate Items]:" line. Item text
        is always one line (`prompts.neutralise`)."""
        texts = self._texts
        ends = list(itertools.islice(self._line_ends(ids, len(ids)), c + 2))
        if len(ends) < c + 2:
            raise ValueError(f"the prompt has {len(ends)} line ends, fewer than the {c} candidate lines with "
                             f"the lines around them need: not a ranking prompt for {c} candidates")
        ends.reverse()  # [Candidate Items] line, the c candidate lines, ### Response line
        if where == "line_end":
            return ends[1:c + 1]
        if where != "identifier":
            raise ValueError(f"candidate position must be 'line_end' or 'identifier', got {where!r}")
        out = []
        for j in range(c):
            start, end = ends[j], ends[j + 1]
            # The line starts after the previous line's newline, inside that token if it runs on.
            found = start if LETTERS[j] in texts[ids[start]].rsplit("\n", 1)[1] else next(
                (i for i in range(start + 1, end + 1) if LETTERS[j] in texts[ids[i]]), None)
            if found is None:
                raise ValueError(f"candidate line {j + 1} has no token holding its identifier {LETTERS[j]!r}")
            out.append(found)
        return out

    def _line_ends(self, ids: Sequence[int], stop: int) -> Iterator[int]:
        """Indices of the tokens holding a newline, walking back from `stop` (excluded)."""
        texts = self._texts
        return (i for i in range(stop - 1, -1, -1) if "\n" in texts[ids[i]])

    def history_lines(self, ids: Sequence[int], c: int) -> list[tuple[int, float | None]]:
        """(index of the line's last token, its rating or None when the line shows none) for each
        history line, in prompt order: the lines between "[User Interaction History]:" and
        "[Candidate Items]:" (read from the end like `candidate_positions`, so the ids may carry
        a response). The user head (model/score_head.py) reads the user's taste from them."""
        texts = self._texts
        first_candidate = self.candidate_positions(ids, c)[0]
        ends = self._line_ends(ids, first_candidate)
        next(ends, None)  # the "[Candidate Items]:" line's end
        lines: list[tuple[int, float | None]] = []
        end = next(ends, None)
        while end is not None:
            start = next(ends, None)  # the previous line's end: its token may run on into this line
            head = texts[ids[start]].rsplit("\n", 1)[1] if start is not None else ""
            text = head + "".join(texts[t] for t in ids[(start or -1) + 1:end + 1])
            line = text[:text.rfind("\n")]
            if HISTORY_HEADER in line:
                lines.reverse()
                return lines
            rating = _RATING.search(line)
            lines.append((end, float(rating[1]) if rating else None))
            end = start
        raise ValueError(f"no {HISTORY_HEADER!r} line before the candidate lines: not a ranking prompt")

    def prompt_ids(self, prefix: str, suffix: str) -> tuple[list[int], int]:
        """Ids of the prompt up to the response header included, and the prefix length."""
        head = self.tokenizer.encode(prefix, add_special_tokens=True)
        tail = self.tokenizer.encode(suffix, add_special_tokens=False)
        return head + tail + self.header_ids, len(head)

    def encode(self, prefix: str, suffix: str, order: Sequence[int]) -> Encoded:
        """The prompt plus the gold response naming prompt positions `order`, best first."""
        prompt, prefix_len = self.prompt_ids(prefix, suffix)
        letters = [self.identifier_ids[j] for j in order]
        ids = prompt + letters + [self.eos_id]
        n_response = len(self.header_ids) + len(letters) + 1
        start = len(prompt)
        return Encoded(
            input_ids=ids,
            labels_mask=[0] * (len(ids) - n_response) + [1] * n_response,
            slot_positions=list(range(start, start + len(letters))),
            prefix_len=prefix_len,
        )
