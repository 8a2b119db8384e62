"""Stage 3, ranking and evaluation: decoding, ranking modes, metrics, baselines, the batch job, reports."""
