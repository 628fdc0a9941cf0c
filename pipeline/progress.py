"""What a local pipeline run shows. kfp's local runner prints each step's whole output: its inputs and
outputs as JSON and every refresh of the pretraining's progress bar, about 800 lines for the demo.
All of it goes to a log file; the terminal gets one line per finished step, a bar for the
pretraining's steps, and on a failure the failed step's last lines."""

from __future__ import annotations

import io
import re
import threading
import time
from collections import defaultdict, deque
from typing import TextIO

from tqdm import tqdm

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # kfp colours task names; bars move the cursor
TASK_STARTED = re.compile(r" - INFO - Executing task '([^']+)'")
TASK_ENDED = re.compile(r" - (?:INFO|ERROR) - Task '([^']+)' finished with status (\w+)")
TRAINING = re.compile(r"epoch (\d+)/(\d+) step (\d+)/(\d+)")  # the pretraining's bar (components/pretrain.py)
SHOWN_ON_FAILURE = 25
KEPT = 200  # lines of the current step kept to show from: a traceback's first line among them
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"


class StepLog(io.TextIOBase):
    """A text stream for kfp's runner to print into (its logger and the steps' streamed output)."""

    def __init__(self, log: TextIO, terminal: TextIO):
        self.log, self.terminal = log, terminal
        self.partial = ""
        self.step: str | None = None  # the latest to start
        self.started: defaultdict[str, deque[float]] = defaultdict(deque)  # kfp runs a loop's tasks at once
        self.recent: deque[str] = deque(maxlen=KEPT)  # the current step's last lines
        self.bar: tqdm | None = None
        self.lock = threading.Lock()  # a loop's tasks print from threads of their own

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            self.log.write(text)
            *lines, self.partial = re.split(r"[\r\n]", self.partial + text)
            for line in lines:
                self._read(ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def _read(self, line: str) -> None:
        if started := TASK_STARTED.search(line):
            self.step = started[1]
            self.started[self.step].append(time.monotonic())
            self.recent.clear()
        elif ended := TASK_ENDED.search(line):
            self._close_bar()
            status = ended[2].lower()
            starts = self.started[ended[1]]
            took = f" in {time.monotonic() - starts.popleft():.0f} s" if starts else ""
            self._show(f"  {ended[1]:<20} {status}{took}\n")
            if status != "success":
                shown = without_traceback(list(self.recent))[-SHOWN_ON_FAILURE:]
                self._show("".join(f"    | {kept}\n" for kept in shown))
        elif line.strip():
            self.recent.append(line.strip())
            if trained := TRAINING.search(line):
                self._show_training(*map(int, trained.groups()))

    def _show(self, text: str) -> None:
        """Straight to the terminal: kfp's runner replaces `print` with one that indents into
        sys.stdout, which is this stream, whose lock the caller holds."""
        self.terminal.write(text)
        self.terminal.flush()

    def _show_training(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        if self.bar is None:
            # every update drawn: they come at the pace of training steps; no rate: a step's output can
            # arrive in bursts
            self.bar = tqdm(total=epochs * steps, desc=f"  {self.step or 'pretrain'}", file=self.terminal,
                            position=0, leave=False, mininterval=0, miniters=1, bar_format=BAR)
        self.bar.set_postfix_str(f"epoch {epoch}/{epochs}", refresh=False)
        self.bar.update((epoch - 1) * steps + step - self.bar.n)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()
        if self.partial:
            self._read(ANSI.sub("", self.partial))
        super().close()


def without_traceback(lines: list[str]) -> list[str]:
    """A failed step's lines with a Python traceback cut down to its last line, the error itself
    (the log file keeps it whole): kfp's executor lets a step's exception end the process."""
    if "Traceback (most recent call last):" not in lines:
        return lines
    return lines[:lines.index("Traceback (most recent call last):")] + lines[-1:]
