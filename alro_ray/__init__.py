"""alro-ray: fine-tune a language model into a list-wise ranker (ALRO) on Ray."""

__version__ = "0.1.0"
