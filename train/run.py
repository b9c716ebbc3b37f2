"""Entry point: parse the config, build the pieces, run the loop.

    deepspeed --num_gpus 2 train/run.py --ds ds_configs/zero2.json --stage distill \
        --shards shards/synthetic --teacher runs/default/teacher/teacher --out runs/default/dcd

Stages: `teacher` fine-tunes the cross-encoder, `student` trains the contrastive-only baseline,
`distill` (default) trains the student by Dynamic Contrastive Distillation from a frozen teacher.

Exit codes: 0 done, or stopped on request inside the training loop (SIGTERM / SIGINT to a rank or
its launcher's process tree, or the launcher gone) after saving a checkpoint: `--resume latest`
continues; 1 an error on some rank (train/failure.py: the job ends at once, one line `error: rank R
failed first: ...`, the traceback in {out}/error-rankR.log); 2 a bad flag, config, data folder or model
spec (one line `error: ...`); 3 `--max-bad-steps` non-finite losses in a row (the weights and optimizer
state those steps left untouched are saved); 128 + the signal when stopped outside the training loop
(start-up, export, teardown) or by a second signal: nothing saved.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train import comm, failure, preflight, run_log
from train import engine as ds_engine
from train.config import ConfigError, RunConfig
from train.data import DataError, make_train_loader
from train.monitor import Monitor, StepTimer
from train.samples import SKIP_REASONS
from train.objectives import build_objective, choose_image_size


class StopRequest:
    """SIGTERM / SIGINT (train/failure.py's handlers) set a flag; the loop saves a checkpoint and exits
    cleanly at the next step.

    Under a launcher (LOCAL_RANK set), the launcher's disappearance counts as a stop request too.
    DeepSpeed 0.19.8's `deepspeed` command installs no SIGTERM handler for local runs: SIGTERM to it
    (a scheduler cancelling the job) kills it alone and its child `deepspeed.launcher.launch` and the
    ranks run on, orphaned. So each rank remembers its parent (and, when the parent is
    deepspeed.launcher.launch, the parent's parent) and stops when either is gone.
    """

    def __init__(self):
        self._parent = os.getppid() if "LOCAL_RANK" in os.environ else None
        self._grandparent = _deepspeed_runner_pid(self._parent) if self._parent else None

    @property
    def requested(self) -> bool:
        return failure.STATE.stop_requested

    @property
    def reason(self) -> str:
        return failure.STATE.stop_reason

    def launcher_gone(self) -> bool:
        if self._parent is None:
            return False
        if os.getppid() != self._parent:
            return True
        if self._grandparent is None:
            return False
        try:
            import psutil
            return psutil.Process(self._parent).ppid() != self._grandparent
        except Exception:
            return True

    def agreed(self, dev) -> bool:
        """True on every rank when any rank was asked to stop (they must all save together)."""
        if not self.requested and self.launcher_gone():
            failure.STATE.stop_requested, failure.STATE.stop_reason = True, "launcher gone"
        flag = torch.tensor([1.0 if self.requested else 0.0], device=dev)
        return bool(comm.all_reduce_max(flag).item() > 0)


def _deepspeed_runner_pid(parent: int) -> int | None:
    """The `deepspeed` command's pid when `parent` is its deepspeed.launcher.launch child."""
    try:
        import psutil
        launcher = psutil.Process(parent)
        if "deepspeed.launcher.launch" not in " ".join(launcher.cmdline()):
            return None
        runner = launcher.parent()
        return runner.pid if runner is not None and "deepspeed" in " ".join(runner.cmdline()) else None
    except Exception:
        return None


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: all ranks must skip a bad step together."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    return comm.all_reduce_max(bad).item() == 0


def main(argv=None) -> int:
    # The config and the preflight checks first, on every rank and before the process group starts
    # (whatever the launcher): a bad flag, config, shard folder or spec is one line, printed by the
    # first rank to fail.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg: RunConfig = preflight.parse_run_flags(argv, world_size)  # None: sys.argv, as argparse reads it
    warnings_found = preflight.check_run(cfg, world_size)
    t = cfg.train
    failure.set_run(t.out)  # a failure from here on has its run folder
    run_log.start_run_log(t.out, int(os.environ.get("RANK", "0")))
    rank, world = comm.init()
    for line in warnings_found:
        log(rank, f"warning: {line}")
    dev = ds_engine.device()
    torch.manual_seed(t.seed + rank)

    ds = ds_engine.read_ds_config(t.ds, world, t.batch_size)
    t.batch_size = ds["train_micro_batch_size_per_gpu"]
    out = Path(t.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")  # the resolved config, beside checkpoints and logs

    failure.fault_point("startup")
    try:
        objective = build_objective(cfg, ds, dev, rank, world)
    except (ConfigError, DataError):
        raise
    except ValueError as err:  # an unknown or unreadable --teacher / --student spec
        raise ConfigError(_first_line(err)) from None
    chosen = choose_image_size(cfg, objective)  # before the loader and the saved config use it
    if chosen:
        log(rank, chosen)
        if rank == 0:
            cfg.save(out / "config.json")
    loop = TrainingLoop(cfg, objective, out, rank, world, dev)
    log(rank, f"stage {t.stage}: {t.steps} steps, {world} rank(s) x batch {t.batch_size}, "
              f"ZeRO-{ds_engine.zero_stage(ds)}, out {out}")

    failure.enter_training_loop()
    while loop.state.step < t.steps:
        if not loop.train_step():  # a non-finite loss: the step was skipped on every rank
            if loop.state.bad_in_a_row >= t.max_bad_steps:
                return loop.stop_for_bad_steps()
            continue
        loop.log_step()
        loop.validate_and_save()
        if loop.stop.agreed(dev):
            loop.save()
            log(rank, f"stop requested ({loop.stop.reason or 'by another rank'}): checkpoint saved at "
                      f"step {loop.state.step}; resume with --resume latest")
            return finish(loop.monitor, 0)

    failure.leave_training_loop()
    return loop.export_and_summarise()


@dataclass
class LoopState:
    """Where the loop stands. step, data_batches and skipped_steps are what a checkpoint keeps."""
    step: int = 0
    data_batches: int = 0              # batches drawn from the loader (skipped steps included)
    skipped_steps: int = 0             # steps skipped for a non-finite loss, over the whole run
    bad_in_a_row: int = 0
    saved_step: int | None = None      # the step whose checkpoint exists and is complete
    start_step: int = 0                # where this process started (resumed or 0)
    loss: torch.Tensor | None = None   # the last step's loss and logs
    logs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # the last validation
    samples_since: int = 0             # samples since the last log line, and when that was
    clock: float = field(default_factory=time.perf_counter)
    loop_start: float = field(default_factory=time.perf_counter)
    overhead_s: float = 0.0            # validation and checkpoints: not training time


class TrainingLoop:
    """One run's loop pieces: the objective's engine, the data, the monitor and the LoopState, with
    one method per thing a step does (train, log, validate and save, stop, export)."""

    def __init__(self, cfg: RunConfig, objective, out: Path, rank: int, world: int, dev):
        self.cfg, self.t, self.objective, self.out = cfg, cfg.train, objective, out
        self.rank, self.world, self.dev = rank, world, dev
        self.student = objective.engine
        self.ckpt_dir = out / "checkpoints"
        self.state = LoopState()
        if self.t.resume:
            saved = ds_engine.load_checkpoint(self.student, self.ckpt_dir, self.t.resume)
            self.state.step, self.state.data_batches = saved["step"], saved["data_batches"]
            self.state.saved_step = self.state.start_step = self.state.step
            self.state.skipped_steps = saved.get("skipped_steps", 0)
            log(rank, f"resumed from {self.ckpt_dir} at step {self.state.step}")
        data = cfg.data
        # an objective that composes its own batches (stored teacher signals: train/clustered.py)
        own_loader = getattr(objective, "make_train_loader", None)
        self.loader = own_loader(self.state.data_batches) if own_loader else make_train_loader(
            data.shards, data.train_split, batch_size=self.t.batch_size, image_size=data.image_size,
            tokenizer=objective.data_tokenizer, max_length=data.max_length, num_workers=data.num_workers,
            rank=rank, world_size=world, seed=self.t.seed, start_batch=self.state.data_batches,
            twins_in_batch=data.twins_in_batch, held_out=objective.validation.held_out)
        self.monitor = Monitor(out / "tb", enabled=rank == 0)
        self.monitor.text(self.state.step, "config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
        self.timer = StepTimer(comm.accelerator().synchronize)
        self.stop = StopRequest()
        self.batches = iter(self.loader)
        self.state.clock = self.state.loop_start = time.perf_counter()

    def train_step(self) -> bool:
        """One optimiser step; False when the loss was not finite on some rank (skipped everywhere:
        a NaN on one rank poisons every rank's averaged gradient)."""
        s = self.state
        with self.timer.section("step"):
            with self.timer.section("data"):
                batch = next(self.batches)
                s.data_batches += 1
            s.loss, s.logs = self.objective.forward(batch, self.timer, s.step)
            failure.fault_point("loss")
            if not all_finite(s.loss):
                s.skipped_steps += 1
                s.bad_in_a_row += 1
                self.student.zero_grad()
                self.monitor.scalars(s.step, {"train/skipped_steps": s.skipped_steps})
                log(self.rank, f"step {s.step}: non-finite loss, step skipped ({s.bad_in_a_row} in a row)")
                return False
            s.bad_in_a_row = 0
            with self.timer.section("backward"):
                self.student.backward(s.loss)
                failure.fault_point("backward")
                self.student.step()
        s.step += 1
        self.timer.step_done()
        s.samples_since += self.t.batch_size * self.world
        return True

    def log_step(self) -> None:
        """Every log_every steps: the scalars, the loaders' skipped samples, one log line."""
        s, t = self.state, self.t
        if not (s.step % t.log_every == 0 or s.step == t.steps):
            return
        elapsed = time.perf_counter() - s.clock
        scalars = {k: v for k, v in s.logs.items() if not isinstance(v, torch.Tensor) or v.numel() == 1}
        scalars.update(self.timer.read())
        scalars["train/lr"] = self.student.get_lr()[0]
        scalars["train/samples_per_s"] = s.samples_since / max(elapsed, 1e-9)
        scalars["train/skipped_steps"] = s.skipped_steps
        skips = loader_skip_counts(self.loader, self.dev)
        scalars.update(skips)
        self.monitor.scalars(s.step, scalars)
        if "train/weights" in s.logs:
            self.monitor.histogram(s.step, "train/weights", s.logs["train/weights"])
        log(self.rank, f"step {s.step}/{t.steps} loss {s.loss.item():.4f} "
                       f"{scalars['train/samples_per_s']:.0f} samples/s" + self.timing() + skip_summary(skips))
        s.samples_since, s.clock = 0, time.perf_counter()

    def timing(self) -> str:
        """`, elapsed 1m05s, ETA 3m20s`: wall time of this process's loop, and the steps left at the
        mean wall time per step so far (validation and checkpoints included, as they will recur)."""
        s = self.state
        elapsed = time.perf_counter() - s.loop_start
        done = s.step - s.start_step
        eta = elapsed / done * (self.t.steps - s.step) if done else float("nan")
        return f", elapsed {duration(elapsed)}, ETA {duration(eta)}"

    def validate_and_save(self) -> None:
        """Every eval_every / save_every steps (and at the last); their time is not training time."""
        s, t = self.state, self.t
        aside = time.perf_counter()
        if self.objective.validation.split is not None and (s.step % t.eval_every == 0 or s.step == t.steps):
            s.metrics = self.objective.validate()
            self.monitor.scalars(s.step, s.metrics)
            for tag, picture in self.objective.pictures(self.objective.validation_split()).items():
                self.monitor.image(s.step, tag, picture)
            log(self.rank, "val " + " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in s.metrics.items()))
        if s.step % t.save_every == 0 or s.step == t.steps:
            self.save()
        s.overhead_s += time.perf_counter() - aside

    def save(self) -> None:
        s = self.state
        if s.saved_step == s.step:  # this step's checkpoint exists and is complete: never rewrite it
            return
        ds_engine.save_checkpoint(self.student, self.ckpt_dir, s.step, keep=self.t.keep_checkpoints, client_state={
            "step": s.step, "data_batches": s.data_batches, "skipped_steps": s.skipped_steps})
        s.saved_step = s.step

    def stop_for_bad_steps(self) -> int:
        """--max-bad-steps non-finite losses in a row: save the state they left untouched, exit 3."""
        s = self.state
        self.save()
        log(self.rank, f"stopping: {s.bad_in_a_row} non-finite losses in a row "
                       f"(--max-bad-steps {self.t.max_bad_steps}); checkpoint saved at step {s.step} "
                       f"(the state before the skipped steps); exit code 3")
        return finish(self.monitor, 3)

    def export_and_summarise(self) -> int:
        s, t = self.state, self.t
        self.record_run()
        self.objective.export(self.out, self.rank)
        train_s = time.perf_counter() - s.loop_start - s.overhead_s
        steps_this_run = s.step - s.start_step
        if self.rank == 0:
            write_summary(self.out / "train_summary.json", stage=t.stage, steps=s.step,
                          steps_this_run=steps_this_run, world_size=self.world, batch_per_rank=t.batch_size,
                          train_seconds=round(train_s, 2),
                          seconds_per_step=round(train_s / max(1, steps_this_run), 4),
                          skipped_steps=s.skipped_steps, final_val=s.metrics)
        log(self.rank, f"done: exported {self.objective.export_name} to {self.out / self.objective.export_name} "
                       f"({train_s:.0f} s of training)")
        return finish(self.monitor, 0)

    def record_run(self) -> None:
        """TensorBoard's view of the whole run: the resolved config against the final validation
        (HPARAMS), and the validation gallery in the student's space (PROJECTOR)."""
        s = self.state
        self.monitor.hparams(scalar_fields(self.cfg.to_dict()), s.metrics)
        if self.objective.validation.split is None:
            return
        projection = self.objective.projection(self.objective.validation_split())
        if projection is not None:
            vectors, metadata, header, thumbnails = projection
            self.monitor.embedding(s.step, "val_gallery", vectors, metadata, header, thumbnails)


def scalar_fields(sections: dict) -> dict:
    """`{"distill.alpha": 0.2, ...}`: every field as a number, bool or string (None as "none")."""
    return {f"{section}.{name}": value if isinstance(value, (bool, int, float, str)) else str(value).lower()
            for section, values in sections.items() for name, value in values.items()}


def loader_skip_counts(loader, dev) -> dict:
    """Corrupt samples the loaders of all ranks skipped so far: `data/skipped` and one tag per reason
    (summed over ranks: a corrupt sample may sit in a shard only another rank reads)."""
    reasons = list(SKIP_REASONS) + ["other"]
    local = [float(loader.skipped.get(r, 0)) for r in SKIP_REASONS]
    local.append(float(sum(n for r, n in loader.skipped.items() if r not in SKIP_REASONS)))
    totals = comm.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=dev))
    counts = {f"data/skipped_{r}": n for r, n in zip(reasons, totals.tolist()) if n > 0}
    counts["data/skipped"] = float(totals.sum().item())
    return counts


def skip_summary(counts: dict) -> str:
    """`; skipped 7 samples (bad_image 2, bad_json 1, ...)` for the log line, or nothing."""
    if not counts.get("data/skipped"):
        return ""
    parts = ", ".join(f"{k[len('data/skipped_'):]} {v:.0f}" for k, v in sorted(counts.items())
                      if k.startswith("data/skipped_"))
    return f"; skipped {counts['data/skipped']:.0f} samples ({parts})"


def duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h03m`; `?` when unknown."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def write_summary(path: Path, **values) -> None:
    """Steps, training seconds and the last validation, for tools that compare runs (ablate, pipeline)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)


def finish(monitor: Monitor, code: int) -> int:
    failure.leave_training_loop()
    monitor.close()
    failure.fault_point("teardown")
    comm.shutdown()
    return code


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[dcd] {message}", flush=True)


if __name__ == "__main__":
    failure.run(main)
