"""The demo's training progress: a bar with the latest loss in it, instead of a printed line per logging step."""

from __future__ import annotations

from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback


class LossInBarCallback(ProgressCallback):
    """`ProgressCallback` that shows the latest training loss in the bar; the logs stay in `trainer.state`."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4g}", refresh=False)


def quiet_progress(trainer: Any) -> Any:
    """`trainer` with `LossInBarCallback` in place of its progress bar or log printer (the quiet demo console
    disables the bar and so gets the printer), returned for chaining."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(LossInBarCallback())
    return trainer
