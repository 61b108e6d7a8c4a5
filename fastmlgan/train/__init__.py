"""Training: the Trainer (the schedule, the G and D steps) and what a run needs around it:
checkpoints, the run folder's rules, the frozen-feature cache, mismatched label sets, loss
guards, pre-emption and the run log. ``python -m fastmlgan.train`` runs the train command
(``fastmlgan.commands.train``); nothing is imported here."""
