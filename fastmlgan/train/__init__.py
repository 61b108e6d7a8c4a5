"""Training: the Trainer (``trainer``, the schedule) over its components, the G and D steps
(``steps``) and the run's state (``state``), and what a run needs around it: checkpoint files,
the run folder's rules, the frozen-feature cache, mismatched label sets, loss guards,
pre-emption and the run log. ``python -m fastmlgan.train`` runs the train command
(``fastmlgan.commands.train``); nothing is imported here."""
