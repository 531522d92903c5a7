"""What a run logs besides losses.csv: a smoothed loss for the progress events, and TensorBoard event files.

TensorBoard is optional (`pip install 'opdiff[tensorboard]'`): `log_with = "auto"` writes its files when the
package is installed, `"tensorboard"` insists on it, `"none"` leaves losses.csv alone. The smoothed loss is an
exponential moving average recomputed from the loss history, so a resumed run continues the same curve.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipelines.rundir import RunDir

log = logging.getLogger(__name__)

SMOOTHING = 0.9
"""Weight of the past in the smoothed loss: about the last ten steps count."""


def check_logging(log_with: str) -> None:
    """Raise ValueError naming the `log_with` setting when TensorBoard is asked for but not installed."""
    if log_with == "tensorboard" and not _has_tensorboard():
        raise ValueError("log_with tensorboard needs the tensorboard package: pip install 'opdiff[tensorboard]' "
                         "(or --log-with none)")


def _has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class Smoothed:
    """Bias-corrected exponential moving average: the first value is itself, later ones blend in at 1 - beta."""

    def __init__(self, beta: float = SMOOTHING, history: Sequence[float] = ()) -> None:
        self.beta, self.average, self.count = beta, 0.0, 0
        for value in history:
            self.add(value)

    def add(self, value: float) -> float:
        """Add a value; return the smoothed value so far."""
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta ** self.count)


class TrainLog:
    """The per-step log of one process: smoothed loss always, TensorBoard files where asked and installed.

    `first_step` is the step the run (re)starts after; TensorBoard drops what an earlier, interrupted attempt
    logged past it, so a resumed run's curves have one value per step.
    """

    def __init__(self, run: RunDir, log_with: str, losses: list[float], write: bool = True) -> None:
        self.smoothed = Smoothed(history=losses)
        self.writer = None
        if write and log_with != "none" and _has_tensorboard():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tensorboard_dir), purge_step=len(losses) + 1)
        elif write and log_with == "auto":
            log.info("TensorBoard logs are off: pip install 'opdiff[tensorboard]' to have them")

    def step(self, step: int, loss: float, rates: dict[str, float], grad_norm: float | None) -> dict:
        """Log one optimizer step; return what the progress event adds (lr, smoothed_loss, grad_norm)."""
        smoothed = self.smoothed.add(loss)
        if self.writer is not None:
            self.writer.add_scalar("loss", loss, step)
            self.writer.add_scalar("loss/smoothed", smoothed, step)
            for name, lr in rates.items():
                self.writer.add_scalar(f"lr/{name}", lr, step)
            if grad_norm is not None:
                self.writer.add_scalar("grad_norm", grad_norm, step)
        extra = {"lr": next(iter(rates.values()), None), "smoothed_loss": smoothed}
        return extra if grad_norm is None else {**extra, "grad_norm": grad_norm}

    def image(self, step: int, image: Image.Image) -> None:
        """Log a sample grid."""
        if self.writer is not None:
            self.writer.add_image("samples", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        """Write everything out and close the files."""
        if self.writer is not None:
            self.writer.close()
