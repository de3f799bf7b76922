"""tsopsd: diagnose, reheat (TS-OPSD), continue RL on, and evaluate reasoning-LLM checkpoints."""

__version__ = "0.1.0"
