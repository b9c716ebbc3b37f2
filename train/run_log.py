"""`{out}/train.log`: what rank 0 prints, kept beside the checkpoints and TensorBoard logs.

Rank 0's stdout and stderr are copied line by line into the file (appended: a resumed run continues
the same log). Every rank's error line reaches it through train/failure.py, which appends the line
of a rank whose stderr is not copied here.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

LOG_NAME = "train.log"


class Tee:
    """A text stream that writes to the original stream and to a log file, flushing both."""

    def __init__(self, stream, log_file):
        self.stream, self.log_file = stream, log_file

    def write(self, text: str) -> int:
        self.stream.write(text)
        try:
            self.log_file.write(text)
            self.log_file.flush()
        except (OSError, ValueError):  # a full disk or a closed file must not end the run
            pass
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the original stream's
        return getattr(self.stream, name)


def start_run_log(out: str | Path, rank: int) -> Path | None:
    """On rank 0, copy stdout and stderr into {out}/train.log from now on; returns its path."""
    if rank != 0:
        return None
    path = Path(out) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(path, "a", encoding="utf-8", buffering=1)
    log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    sys.stdout = Tee(sys.stdout, log_file)
    sys.stderr = Tee(sys.stderr, log_file)
    return path
