"""TensorBoard on rank 0 (scalars, histograms, pictures, hparams, projector) and a step timer whose
sections become `time/*` scalars."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch


class Monitor:
    """Writes scalars, histograms and images to `{out}/tb` from rank 0; other ranks write nothing."""

    def __init__(self, log_dir: str | Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            self.writer.add_scalar(tag, float(value), step)

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, step: int, tag: str, picture) -> None:
        """A PIL picture (or HxWx3 uint8 array) under IMAGES."""
        if self.writer is not None:
            import numpy as np
            self.writer.add_image(tag, np.asarray(picture), step, dataformats="HWC")

    def hparams(self, config: dict, metrics: dict) -> None:
        """The HPARAMS tab: the config's scalar fields against the final metrics. Written into this
        run's own event file (not add_hparams' extra sub-run), so that the runs under one --logdir
        (tools/ablate.py's) are its rows, their val/* scalars its metric columns."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams
        for summary in hparams(config, {tag: float(value) for tag, value in metrics.items()}):
            self.writer.file_writer.add_summary(summary)

    def embedding(self, step: int, tag: str, vectors: torch.Tensor, metadata: list, header: list,
                  thumbnails: torch.Tensor) -> None:
        """The PROJECTOR tab: vectors with their metadata rows and float [N, 3, H, W] thumbnails."""
        if self.writer is not None:
            self.writer.add_embedding(vectors, metadata=metadata, metadata_header=header,
                                      label_img=thumbnails, global_step=step, tag=tag)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepTimer:
    """Wall time per named section of a step, averaged over the steps since the last `read()`.

    The accelerator is synchronised at section ends so asynchronous GPU work is charged to the
    section that launched it (a no-op on CPU).
    """

    def __init__(self, synchronize=None):
        self.synchronize = synchronize or (lambda: None)
        self.totals = defaultdict(float)
        self.steps = 0

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.totals[name] += time.perf_counter() - start

    def step_done(self) -> None:
        self.steps += 1

    def read(self) -> dict:
        """Mean seconds per step of each section as `time/<name>`, then reset."""
        steps = max(1, self.steps)
        result = {f"time/{name}": total / steps for name, total in self.totals.items()}
        self.totals.clear()
        self.steps = 0
        return result
