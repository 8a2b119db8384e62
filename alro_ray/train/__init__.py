"""Stage 2, training: the ALRO losses, the objective on a model, Ray Train fine-tuning, Ray Tune search."""
