"""What the run says while it trains: a progress bar on a terminal, plain lines in a log file.

On a TTY it is tqdm with the loss and lr in the postfix from the first step on (refreshed every
``log_every`` steps after that). When stderr is a file or a pipe, a bar's ``\\r`` redraws pile up into
one megabyte-long line, so it prints one plain line every ``log_every`` steps (and the first and the
last) instead::

    step 10/300 (3%) · loss 1.2345 · lr 2.00e-04 · 0.41 s/step · eta 2m 0s

s/step is the mean optimizer-step time so far, evaluation excluded (the loop times it separately).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, log_every: int, stream: TextIO | None = None):
        self.total, self.done, self.log_every = total, initial, log_every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.first = initial
        self.step_seconds = 0.0  # optimizer steps only
        self.bar = None
        if enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train",
                            file=self.stream)

    def update(self, step: int, loss: float, lr: float, seconds: float) -> None:
        """After optimizer step ``step`` (1-based) took ``seconds`` (without evaluation)."""
        self.done, self.step_seconds = step, self.step_seconds + seconds
        if not self.enabled:
            return
        show = step == self.first + 1 or step % self.log_every == 0 or step == self.total
        if self.bar is not None:
            self.bar.update(1)
            if show:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif show:
            print(line(step, self.total, loss, lr, self.step_seconds / max(1, step - self.first)),
                  file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """Print ``text`` to stdout without breaking the bar (tqdm clears and redraws it)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def line(step: int, total: int, loss: float, lr: float, s_per_step: float) -> str:
    eta = s_per_step * (total - step)
    return (f"step {step}/{total} ({100 * step / max(total, 1):.0f}%) · loss {loss:.4f} · lr {lr:.2e} · "
            f"{s_per_step:.2f} s/step · eta {int(eta // 60)}m {int(eta % 60)}s")


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    """A warning when warm-up does not end before the run does: the peak lr is never reached."""
    if warmup_steps and warmup_steps >= total_steps:
        return (f"warning: warmup_steps={warmup_steps} ≥ the run's {total_steps} steps: warm-up takes the whole "
                f"run and the learning rate reaches only {total_steps / warmup_steps:.0%} of lr, at the last step. "
                "Lower warmup_steps or raise max_steps/epochs.")
    return None


@contextmanager
def quiet_loading(show_bars: bool, stream: TextIO | None = None) -> Iterator[None]:
    """transformers' own bars (loading weights, writing shards) while the model loads: kept on a
    terminal when the run shows progress, off otherwise (off a TTY their redraws would pile up)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not (show_bars and _isatty(stream if stream is not None else sys.stderr)):
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or fake stream
        return False
