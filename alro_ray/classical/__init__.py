"""The floor: classical recommenders, importing nothing from the package but each other.

Baselines for the ranking table (spec §6): random, popularity, item mean rating, biased matrix
factorization, GRU4Rec and SASRec. Each (by name: `registry.BASELINES`) has `fit(interactions)` (columns user, item, rating,
timestamp) and `score(row)` (one prepared row's candidates, higher = better). `baseline_orders`
turns scores into orders of prompt positions, best first; ties keep prompt-position order (a
stable sort), so every order is deterministic.

The three learned models are small torch (CPU) re-implementations, not RecBole: RecBole 1.2.1 (its
latest release) stops in `Config()` under numpy 2 (`np.float_`), its pinned ray 2.6.3 needs the
removed `pkg_resources`, and under pandas 3 its in-place `fillna` calls silently do nothing. They
are seeded inside a forked torch RNG, so fitting one leaves the caller's random state alone.

GRU4Rec and SASRec are next-item models: they predict *which* item a user will interact with, not
how highly she will rate it, so on graded NDCG over a window the user did watch they need not beat
the item-mean order.
"""
