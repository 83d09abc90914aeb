"""The training's log lines and its cancellation, as a transformers TrainerCallback."""

import logging
import time

log = logging.getLogger(__name__)


def trainer_callback():
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        """Keeps the Trainer's log entries."""

        def __init__(self, samples_per_step: int, stop=None):
            self.samples_per_step, self.stop = samples_per_step, stop
            self.history: list[dict] = []
            self.step_time, self.steps = 0.0, 0
            self.started: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.started is not None:
                self.step_time += time.perf_counter() - self.started
                self.steps += 1
                self.started = None
            if self.stop is not None and self.stop.is_set():  # the training was cancelled
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            self.history.append({**logs, "step": state.global_step})
            if "loss" in logs:
                rate = self.steps * self.samples_per_step / self.step_time if self.step_time else float("nan")
                grad = f"  grad norm {logs['grad_norm']:.3f}" if "grad_norm" in logs else ""
                log.info("step %d/%d  epoch %.2f  loss %.4f  learning rate %.3g  %.2f samples/s%s",
                         state.global_step, state.max_steps, logs.get("epoch", 0.0), logs["loss"],
                         logs.get("learning_rate", float("nan")), rate, grad)
                self.step_time, self.steps = 0.0, 0
            if "eval_loss" in logs:
                log.info("step %d/%d  validation loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])
            if "train_runtime" in logs:
                log.info("training done: %d steps in %.1f s, %.2f samples/s, mean training loss %.4f",
                         state.global_step, logs["train_runtime"], logs.get("train_samples_per_second", 0.0),
                         logs.get("train_loss", float("nan")))

    return LogCallback
