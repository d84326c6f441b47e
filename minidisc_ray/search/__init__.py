"""Teacher-assistant search on Ray Tune: the sandwich-bisection searcher (:mod:`.searcher`), the candidate trials
(:mod:`.trial`, :mod:`.train_trial`), the halving round (:mod:`.arms`, :mod:`.arm_trials`, :mod:`.halving`,
:mod:`.optuna_kd`), the search summary (:mod:`.summary`) and the driver that runs the strategies of
:mod:`minidisc_ray.strategies` (:mod:`.driver`)."""
