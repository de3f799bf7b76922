"""Optional mirrors of a training run's metrics log: TensorBoard and Weights & Biases (main process only)."""

from __future__ import annotations

from pathlib import Path

from tsopsd_cli.errors import MissingDependencyError


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
            self.tb = SummaryWriter(str(run_path / "tensorboard"))
        if logging_section.wandb_project:
            try:
                import wandb
            except ImportError:
                raise MissingDependencyError("logging.wandb_project needs the wandb package") from None
            self.wandb = wandb.init(project=logging_section.wandb_project, name=run_name, config=config)

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
