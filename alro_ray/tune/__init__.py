"""Ray Tune + Optuna over the ALRO loss weights (`alro tune`): the study (`study`), its search
space (`space`), the trials' resources (`resources`), interrupting and resuming (`interrupt`), and
the trial table and plot (`report`)."""
