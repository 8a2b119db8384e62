"""The jobs above training: batch evaluation (`alro evaluate`), the comparison ladder (`alro
compare`) and its results files, reports and plots, the classical baselines run on a split, and
fitting fusion weights on the validation split."""
