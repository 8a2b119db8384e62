"""Learned baselines, small torch (CPU) models: biased matrix factorization, GRU4Rec, SASRec.
Each is seeded inside a forked torch RNG, so fitting one leaves the caller's random state alone."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn

from alro_ray.classical.common import candidate_ids, sorted_interactions


@contextmanager
def _torch_threads(n: int):
    """Tiny models on a shared CPU: more threads than free cores makes each small op spin and wait
    (measured 8x slower fitting MF with 2 threads on 2 busy cores than with 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def _seeded(seed: int):
    """Seed torch inside a forked RNG state, so the caller's random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _Vocab:
    """String id -> index 1..n; 0 is padding / unknown."""

    def __init__(self, ids):
        self.ids = list(dict.fromkeys(ids))
        self.index = {k: i + 1 for i, k in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids) + 1

    def encode(self, keys) -> np.ndarray:
        return np.array([self.index.get(str(k), 0) for k in keys], dtype=np.int64)


class MFBaseline:
    """Biased matrix factorization, r(u, i) = mu + b_u + b_i + p_u . q_i, fitted with Adam on the
    squared error of the fit ratings plus L2 on the parameters a batch touches. A user unseen at fit
    time scores by item bias alone; an unseen item gets b_i = 0, q_i = 0 (the global mean)."""

    name = "mf"

    # Defaults: reg picked on the ml-100k valid split among 0.02 / 0.05 / 0.1 / 0.2 (NDCG@10
    # 0.71 / 0.73 / 0.76 / 0.76); weaker L2 overfits the few ratings of valid/test users.
    def __init__(self, seed: int = 0, dim: int = 32, epochs: int = 10, lr: float = 0.02,
                 reg: float = 0.1, batch_size: int = 4096, threads: int = 1):
        self.seed, self.dim, self.epochs, self.lr = int(seed), dim, epochs, lr
        self.reg, self.batch_size, self.threads = reg, batch_size, threads

    def fit(self, interactions: pd.DataFrame) -> "MFBaseline":
        df = sorted_interactions(interactions)
        self.users, self.items = _Vocab(df["user"]), _Vocab(df["item"])
        u = torch.from_numpy(self.users.encode(df["user"]))
        i = torch.from_numpy(self.items.encode(df["item"]))
        r = torch.tensor(df["rating"].to_numpy(np.float32))
        self.mu = float(r.mean())
        with _seeded(self.seed), _torch_threads(self.threads):
            self.P = nn.Embedding(len(self.users), self.dim)
            self.Q = nn.Embedding(len(self.items), self.dim)
            self.bu = nn.Embedding(len(self.users), 1)
            self.bi = nn.Embedding(len(self.items), 1)
            for e in (self.P, self.Q):
                nn.init.normal_(e.weight, std=0.05)
            for e in (self.bu, self.bi):
                nn.init.zeros_(e.weight)
            params = [e.weight for e in (self.P, self.Q, self.bu, self.bi)]
            opt = torch.optim.Adam(params, lr=self.lr)
            for _ in range(self.epochs):
                for b in torch.randperm(len(r)).split(self.batch_size):
                    ub, ib = u[b], i[b]
                    p, q, bu, bi = self.P(ub), self.Q(ib), self.bu(ub)[:, 0], self.bi(ib)[:, 0]
                    pred = self.mu + bu + bi + (p * q).sum(1)
                    penalty = (p.square().sum(1) + q.square().sum(1) + bu.square() + bi.square()).mean()
                    loss = (pred - r[b]).square().mean() + self.reg * penalty
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        # Padding index 0 stands for "unseen": no bias, no factors.
        with torch.no_grad():
            for e in (self.P, self.Q, self.bu, self.bi):
                e.weight[0].zero_()
        return self

    @torch.no_grad()
    def score(self, row) -> np.ndarray:
        i = torch.from_numpy(self.items.encode(candidate_ids(row)))
        u = int(self.users.encode([row["user"]])[0])
        pred = self.mu + self.bi(i)[:, 0]
        if u:  # known user: her bias is a constant, only the factors reorder
            pred = pred + self.bu.weight[u, 0] + self.Q(i) @ self.P.weight[u]
        return pred.double().numpy()


class _SequentialBaseline:
    """Shared part of GRU4Rec and SASRec: next-item prediction over each user's time-ordered fit
    sequence, softmax cross-entropy with the output layer tied to the item embeddings; sampled
    (the target against `negatives` uniform draws shared by the batch) by default, which keeps a
    ml-100k epoch around a second on one core and scales to larger catalogs; negatives=None is the
    full softmax. Training cuts every sequence into non-overlapping
    pieces of max_len + 1 items from its end; every position predicts the item after it.

    Scoring uses the user's fit sequence up to the end of the row's history (for a valid/test user
    that is her whole fit sequence, which stops before the candidate window; for a training row it
    cuts off the candidates that the fit data holds). Users absent from the fit data fall back to
    the row's history. Candidates never seen at fit time get the lowest logit of any item: they
    were never interacted with, the least likely next item."""

    name = "sequential"

    def __init__(self, seed: int = 0, dim: int = 64, max_len: int = 50, epochs: int = 20,
                 lr: float = 2e-3, batch_size: int = 128, dropout: float = 0.2,
                 negatives: int | None = 256, threads: int = 1):
        self.seed, self.dim, self.max_len, self.epochs = int(seed), dim, max_len, epochs
        self.negatives = negatives
        self.lr, self.batch_size, self.dropout, self.threads = lr, batch_size, dropout, threads

    def _encoder(self, n_items: int) -> nn.Module:
        raise NotImplementedError

    def fit(self, interactions: pd.DataFrame) -> "_SequentialBaseline":
        df = sorted_interactions(interactions)
        self.items = _Vocab(df["item"])
        codes = self.items.encode(df["item"])
        self.sequences: dict[str, np.ndarray] = {
            u: codes[idx] for u, idx in df.groupby("user", sort=False).indices.items()}
        pieces = []
        for seq in self.sequences.values():
            for end in range(len(seq), 1, -self.max_len):
                piece = seq[max(0, end - self.max_len - 1):end]
                pieces.append(np.pad(piece, (self.max_len + 1 - len(piece), 0)))  # left-pad with 0
        data = torch.from_numpy(np.stack(pieces))
        with _seeded(self.seed), _torch_threads(self.threads):
            self.net = self._encoder(len(self.items))
            opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
            self.net.train()
            for _ in range(self.epochs):
                for b in torch.randperm(len(data)).split(self.batch_size):
                    x, y = data[b, :-1], data[b, 1:]
                    keep = y > 0                                    # padded targets carry no loss
                    loss = self._loss(self.net(x)[keep], y[keep])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        self.net.eval()
        return self

    def _loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the true next items y [N] given states h [N, dim]: over all items, or
        over the target and `negatives` items drawn uniformly for the whole batch (a draw that hits
        a row's own target is masked out)."""
        w = self.net.emb.weight
        if self.negatives is None or self.negatives >= len(self.items) - 1:
            return nn.functional.cross_entropy(h @ w[1:].T, y - 1)
        neg = torch.randint(1, len(self.items), (self.negatives,))
        neg_logits = (h @ w[neg].T).masked_fill(neg[None, :] == y[:, None], float("-inf"))
        logits = torch.cat([(h * w[y]).sum(-1, keepdim=True), neg_logits], dim=1)
        return nn.functional.cross_entropy(logits, torch.zeros_like(y))

    def _context(self, row) -> np.ndarray:
        history = self.items.encode(row["history_items"])
        seq = self.sequences.get(str(row["user"]))
        if seq is None:
            return history[history > 0]
        h = len(history)
        if h == 0 or (len(seq) >= h and np.array_equal(seq[-h:], history)):
            return seq
        for end in range(len(seq), h - 1, -1):  # latest place where the history ends
            if np.array_equal(seq[end - h:end], history):
                return seq[:end]
        return history[history > 0]

    @torch.no_grad()
    def score(self, row) -> np.ndarray:
        ctx = self._context(row)[-self.max_len:]
        x = torch.from_numpy(np.pad(ctx, (self.max_len - len(ctx), 0)))[None]
        with _torch_threads(self.threads):
            logits = (self.net(x)[0, -1] @ self.net.emb.weight.T)[1:]  # drop the padding item
        cand = self.items.encode(candidate_ids(row))
        floor = float(logits.min())
        return np.array([float(logits[c - 1]) if c else floor for c in cand], dtype=np.float64)


class _GRUNet(nn.Module):
    def __init__(self, n_items: int, dim: int, dropout: float):
        super().__init__()
        self.emb = nn.Embedding(n_items, dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, x):  # [B, L] -> [B, L, dim]; left padding only delays the first real input
        return self.gru(self.drop(self.emb(x)))[0]


class GRU4RecBaseline(_SequentialBaseline):
    """GRU4Rec (Hidasi et al. 2016): a one-layer GRU over the item sequence. Trained with
    (sampled) softmax cross-entropy on padded pieces instead of the paper's session-parallel
    mini-batches and ranking losses (its later versions also offer cross-entropy)."""

    name = "gru4rec"

    def _encoder(self, n_items: int) -> nn.Module:
        return _GRUNet(n_items, self.dim, self.dropout)


class _SASNet(nn.Module):
    def __init__(self, n_items: int, dim: int, max_len: int, dropout: float, layers: int, heads: int):
        super().__init__()
        self.emb = nn.Embedding(n_items, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        # Small item vectors: they are also the output layer, and N(0, 1) against layer-normed
        # states (norm ~ sqrt(dim)) gives logits of std ~ sqrt(dim) at the start and a stuck model.
        nn.init.normal_(self.emb.weight, std=dim ** -0.5)
        nn.init.normal_(self.pos.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.emb.weight[0].zero_()  # the init above overwrote the padding row

    def forward(self, x):  # [B, L] -> [B, L, dim]
        L = x.shape[1]
        h = self.emb(x) + self.pos(torch.arange(L))
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
        # No key-padding mask: with left padding a fully masked row (a padded query) would give NaN.
        # Real positions may attend to padded ones (position embedding only), the same in training
        # and scoring, and padded positions carry no loss.
        return self.norm(self.blocks(self.drop(h), mask=causal))


class SASRecBaseline(_SequentialBaseline):
    """SASRec (Kang & McAuley 2018): causal self-attention over the item sequence with learned
    positions. Softmax cross-entropy over many negatives instead of the paper's one sampled
    negative with binary cross-entropy (known to train better; Klenitskiy & Vasilev 2023)."""

    name = "sasrec"

    # 10 epochs: on the ml-100k valid split 20 were no better (next-item HR@10 0.10 vs 0.12) at
    # twice the time.
    def __init__(self, seed: int = 0, layers: int = 2, heads: int = 1, epochs: int = 10, **kw):
        super().__init__(seed, epochs=epochs, **kw)
        self.layers, self.heads = layers, heads

    def _encoder(self, n_items: int) -> nn.Module:
        return _SASNet(n_items, self.dim, self.max_len, self.dropout, self.layers, self.heads)
