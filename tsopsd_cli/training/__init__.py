"""The training machinery rl and reheat share: the run (setup, loop, checkpoints, resume, several processes), the
TS-OPSD step, the entropy thermostat, validation, the optimiser and its guards, the metrics sink."""
