"""The inference library that training, evaluation and Serve share: a loaded ranker (`ranker`),
the ranking modes (`modes`, `ranking`, `decoding`), metrics, evaluation helpers and score fusion."""
