"""Faults the loop survives: non-finite or spiking steps (skipped on the device), hangs (watchdog), injected faults."""

import faulthandler
import logging
import math
import os
import sys
import threading
import time

import torch

log = logging.getLogger(__name__)

# Test hooks (environment): make step N's loss NaN, or make rank R hang at step N.
INJECT_NAN_ENV = "QWEN2_INJECT_NAN_STEP"
INJECT_HANG_ENV = "QWEN2_INJECT_HANG"  # "STEP:RANK"
HANG_EXIT_CODE = 75


class TrainingHalted(Exception):
    """Training stopped on purpose after too many skipped steps; a checkpoint of the last good state exists."""


class StepGuard:
    """Decides on the device, without a host sync, whether a step's update is applied.

    A step is skipped when its loss or gradient norm is not finite, or (spike_sigma > 0) when its loss lies more than
    spike_sigma standard deviations above the mean of the last `window` applied steps. The verdict feeds the fused
    optimizer's found_inf, which leaves parameters and optimizer state untouched. Counters stay on the device and
    are read at logging time; the longest run of skipped steps since the last read is kept, so a run that ended
    between two reads is still seen.
    """

    def __init__(self, device: torch.device, spike_sigma: float = 0.0, window: int = 128):
        self.spike_sigma = spike_sigma
        self.window = window
        self.history = torch.zeros(window, device=device)
        # Applied steps: an integer, where a float32 count stopped at 2**24 and kept overwriting one slot.
        self.filled = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.longest_in_a_row = torch.zeros((), dtype=torch.int64, device=device)  # since the last counts()
        self.position = 0

    def verdict(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """1.0 when this step must be skipped, else 0.0 (a device tensor)."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.spike_sigma > 0:
            full = self.filled >= self.window
            mean = self.history.mean()
            std = self.history.std()
            bad = bad | (full & (loss > mean + self.spike_sigma * std))
            # Only applied steps enter the window, so one spike cannot widen the band for the next; in the slot of
            # the oldest applied one (counted by applied steps: a skipped step before the window filled would leave
            # a slot at its initial 0 in a window taken as full, and the band 10x wider).
            slot = self.filled.long() % self.window
            self.history[slot] = torch.where(bad, self.history[slot], loss.detach().float())
            self.filled += (~bad).to(self.filled.dtype)
            self.position += 1
        bad_int = bad.to(torch.int64)
        self.skipped_total += bad_int
        self.skipped_in_a_row = (self.skipped_in_a_row + bad_int) * bad_int
        self.longest_in_a_row = torch.maximum(self.longest_in_a_row, self.skipped_in_a_row)
        return bad.float()

    def spike_note(self, loss: float, grad_norm: float) -> str:
        """Why the step just taken was skipped when its loss and norm are finite (the spike band, a host sync), for
        a halt's message; '' when it was not skipped for a spike."""
        if self.spike_sigma <= 0 or not (math.isfinite(loss) and math.isfinite(grad_norm)) \
                or int(self.skipped_in_a_row.item()) == 0:
            return ""
        mean, std = float(self.history.mean()), float(self.history.std())
        return (f" The last step's loss {loss:.4g} is finite: the spike guard skipped it as more than "
                f"train.spike_sigma={self.spike_sigma:g} standard deviations ({std:.3g}) above the mean ({mean:.4g}) "
                f"of the last train.spike_window={self.window} applied steps. If the loss level has risen for good "
                "(new data, a new stage), every later step is skipped too: restart with a larger train.spike_sigma "
                "or train.spike_sigma=0 (off).")

    def counts(self) -> tuple[int, int]:
        """(skipped steps in total, the longest run of steps skipped in a row since the last call); a host sync."""
        total, longest = int(self.skipped_total.item()), int(self.longest_in_a_row.item())
        self.longest_in_a_row.copy_(self.skipped_in_a_row)
        return total, longest

    def forget_streak(self) -> None:
        """The run of skipped steps has been acted on (the run halts): a run resumed from the checkpoint written now
        starts a streak of its own rather than halting again at its first logging step."""
        self.skipped_in_a_row.zero_()
        self.longest_in_a_row.zero_()

    def forget_losses(self) -> None:
        """A new data stage (data.new_stage): the losses of the old data say nothing of the new data's level, so the
        spike window starts empty (no step is skipped for a spike until it is full again); the counts stay."""
        self.history.zero_()
        self.filled.zero_()
        self.position = 0

    def state_dict(self) -> dict:
        """Everything a resumed run needs to decide as the uninterrupted one would (JSON-ready)."""
        state = {"skipped_total": int(self.skipped_total.item()), "skipped_in_a_row": int(self.skipped_in_a_row.item()),
                 "longest_in_a_row": int(self.longest_in_a_row.item())}
        if self.spike_sigma > 0:
            state.update(history=self.history.tolist(), filled=int(self.filled.item()), position=self.position)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total.fill_(state.get("skipped_total", 0))
        self.skipped_in_a_row.fill_(state.get("skipped_in_a_row", 0))
        self.longest_in_a_row.fill_(state.get("longest_in_a_row", 0))
        history = state.get("history")
        if self.spike_sigma > 0 and history is not None and len(history) == self.window:
            self.history.copy_(torch.tensor(history, dtype=self.history.dtype))
            self.filled.fill_(int(state["filled"]))  # a float in the checkpoints of earlier versions
            self.position = int(state["position"])
        elif self.spike_sigma > 0 and history is not None:
            log.warning("spike guard: the checkpoint's loss window has %d steps, train.spike_window=%d; starting "
                        "an empty window", len(history), self.window)


def inject_nan(step: int, loss: torch.Tensor) -> torch.Tensor:
    """The loss, made NaN at the step named by QWEN2_INJECT_NAN_STEP (tests only)."""
    if os.environ.get(INJECT_NAN_ENV) == str(step):
        log.warning("fault injection: loss of step %d set to NaN (%s)", step, INJECT_NAN_ENV)
        return loss * float("nan")
    return loss


def inject_hang(step: int, rank: int) -> None:
    """Block forever at the step and rank named by QWEN2_INJECT_HANG=STEP:RANK (tests only)."""
    spec = os.environ.get(INJECT_HANG_ENV)
    if spec and spec == f"{step}:{rank}":
        log.warning("fault injection: rank %d hangs at step %d (%s)", rank, step, INJECT_HANG_ENV)
        while True:
            time.sleep(3600)


class Watchdog:
    """Exits the process with every thread's stack when no step completes in time, so the launcher restarts it."""

    def __init__(self, timeout_s: float, first_timeout_s: float, log_file: str | None = None):
        self.timeout_s = timeout_s
        self.first_timeout_s = first_timeout_s
        self.log_file = log_file
        self.beats = 0
        self.last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwen2-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 or self.first_timeout_s > 0:  # either limit may be off (0) on its own
            self._thread.start()
        return self

    def beat(self) -> None:
        """A step, an evaluation or a checkpoint save completed."""
        self.last_beat = time.monotonic()  # first: the watchdog reads beats, then last_beat
        self.beats += 1

    def rearm_first(self) -> None:
        """Give the next step train.hang_timeout_first again, as if nothing had completed yet (eval.at_start's
        evaluation comes before the first step, which compiles and allocates what training needs)."""
        self.last_beat = time.monotonic()  # first: the watchdog reads beats, then last_beat
        self.beats = 0

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        tick = min(5.0, min(t for t in (self.timeout_s, self.first_timeout_s) if t > 0) / 4)
        while not self._stop.wait(tick):
            first = self.beats == 0
            limit = self.first_timeout_s if first else self.timeout_s
            idle = time.monotonic() - self.last_beat
            if limit > 0 and idle > limit:
                self._fire(idle, limit, "train.hang_timeout_first" if first else "train.hang_timeout")

    def _fire(self, idle: float, limit: float, key: str) -> None:
        message = (f"watchdog: no training step, evaluation or save completed for {idle:.0f} s ({key}={limit:.0f} s); "
                   f"dumping all stacks and exiting with code {HANG_EXIT_CODE} so the launcher can restart the job")
        log.error(message)
        for handler in logging.getLogger().handlers:
            handler.flush()
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(message + "\n")
                faulthandler.dump_traceback(file=f, all_threads=True)
        os._exit(HANG_EXIT_CODE)
