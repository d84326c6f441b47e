"""Teacher-assistant search on Ray Tune: the sandwich-bisection searcher (:mod:`.searcher`), the candidate trials
(:mod:`.trial`, :mod:`.train_trial`), the halving round (:mod:`.arms`, :mod:`.arm_trials`, :mod:`.halving`,
:mod:`.optuna_kd`), the strategies (:mod:`.strategies`) and the driver that runs them (:mod:`.driver`)."""
