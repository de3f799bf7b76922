"""Optional mirrors of a training run's metrics log: TensorBoard and Weights & Biases (main process only).

A mirror that cannot start (wandb's login or network, a folder tensorboard cannot write) stops the run at
start-up with one line (exit 8), before any step; metrics.jsonl stays the record of every run.
"""

from __future__ import annotations

from pathlib import Path

from tsopsd_cli.errors import EnvironmentFailure, MissingDependencyError, storage


class MetricsSink:
    def __init__(self, logging_section, run_path: Path, run_name: str, config: dict, main: bool):
        self.tb = None
        self.wandb = None
        if not main:
            return
        if logging_section.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingDependencyError("logging.tensorboard needs the tensorboard package") from None
            with storage(f"logging.tensorboard: creating {run_path / 'tensorboard'}", "nothing was kept"):
                self.tb = SummaryWriter(str(run_path / "tensorboard"))
        if logging_section.wandb_project:
            try:
                import wandb
            except ImportError:
                raise MissingDependencyError("logging.wandb_project needs the wandb package") from None
            try:
                self.wandb = wandb.init(project=logging_section.wandb_project, name=run_name, config=config)
            except Exception as e:  # noqa: BLE001 - wandb reports login, network and service failures in many types
                text = str(e).strip().splitlines()
                raise EnvironmentFailure(f"logging.wandb_project: wandb could not start a run "
                                         f"({text[0][:200] if text else type(e).__name__}); check `wandb login` "
                                         "and the network, or turn logging.wandb_project off") from None

    def write(self, row: dict) -> None:
        step = row.get("step", 0)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
