"""Token ids of prompts and gold responses, with the positions the losses need.

Pieces are tokenized separately and concatenated (prefix | suffix | header | letters | eos) so
that (a) a prompt and its permuted twin share a token-identical prefix, and (b) every identifier
is exactly one known token at a known position. Training, evaluation and serving all go through
`RankTokenizer`, so they see the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from alro_ray.errors import ConfigError
from alro_ray.data.prompts import LETTERS, RESPONSE_HEADER


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
