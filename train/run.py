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
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python train/run.py` and the deepspeed launcher run it as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

# torch 2.13 marks all_gather_into_tensor / reduce_scatter_tensor (called by DeepSpeed) and the
# autograd all_gather of torch.distributed.nn (whose replacement is private) deprecated: one warning
# per call and rank would bury the training log.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")

from train import comm, failure
from train import engine as ds_engine
from train.config import ConfigError, RunConfig, parse_config
from train.data import SKIP_REASONS, DataError, make_train_loader
from train.monitor import Monitor, StepTimer
from train.objectives import build_objective


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
    # The config first (the same on every rank), so that a failure from here on has its run folder.
    cfg: RunConfig = parse_config(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    t = cfg.train
    failure.set_run(t.out)
    rank, world = comm.init()
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
    student = objective.engine
    ckpt_dir = out / "checkpoints"
    step, data_batches, bad_in_a_row, skipped_steps, saved_step = 0, 0, 0, 0, None
    if t.resume:
        state = ds_engine.load_checkpoint(student, ckpt_dir, t.resume)
        step, data_batches = state["step"], state["data_batches"]
        saved_step = step
        skipped_steps = state.get("skipped_steps", 0)
        log(rank, f"resumed from {ckpt_dir} at step {step}")

    tokenizer = objective.data_tokenizer
    loader = make_train_loader(
        cfg.data.shards, cfg.data.train_split, batch_size=t.batch_size,
        image_size=cfg.data.image_size, tokenizer=tokenizer, max_length=cfg.data.max_length,
        num_workers=cfg.data.num_workers, rank=rank, world_size=world, seed=t.seed,
        start_batch=data_batches, twins_in_batch=cfg.data.twins_in_batch)
    monitor = Monitor(out / "tb", enabled=rank == 0)
    monitor.text(step, "config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
    timer = StepTimer(comm.accelerator().synchronize)
    stop = StopRequest()
    batches = iter(loader)
    samples_since, clock = 0, time.perf_counter()
    loop_start, overhead_s, start_step, metrics = time.perf_counter(), 0.0, step, {}
    log(rank, f"stage {t.stage}: {t.steps} steps, {world} rank(s) x batch {t.batch_size}, "
              f"ZeRO-{ds_engine.zero_stage(ds)}, out {out}")

    def save():
        nonlocal saved_step
        if saved_step == step:  # this step's checkpoint exists and is complete: never rewrite it
            return
        ds_engine.save_checkpoint(student, ckpt_dir, step, keep=t.keep_checkpoints, client_state={
            "step": step, "data_batches": data_batches, "skipped_steps": skipped_steps})
        saved_step = step

    failure.enter_training_loop()
    while step < t.steps:
        with timer.section("step"):
            with timer.section("data"):
                batch = next(batches)
                data_batches += 1
            loss, logs = objective.forward(batch, timer, step)
            failure.fault_point("loss")
            if not all_finite(loss):
                # A NaN on one rank poisons every rank's averaged gradient: skip the step everywhere.
                skipped_steps += 1
                bad_in_a_row += 1
                student.zero_grad()
                monitor.scalars(step, {"train/skipped_steps": skipped_steps})
                log(rank, f"step {step}: non-finite loss, step skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= t.max_bad_steps:
                    save()
                    log(rank, f"stopping: {bad_in_a_row} non-finite losses in a row "
                              f"(--max-bad-steps {t.max_bad_steps}); checkpoint saved at step {step} "
                              f"(the state before the skipped steps); exit code 3")
                    return finish(monitor, 3)
                continue
            bad_in_a_row = 0
            with timer.section("backward"):
                student.backward(loss)
                failure.fault_point("backward")
                student.step()
        step += 1
        timer.step_done()
        samples_since += t.batch_size * world

        if step % t.log_every == 0 or step == t.steps:
            elapsed = time.perf_counter() - clock
            scalars = {k: v for k, v in logs.items() if not isinstance(v, torch.Tensor) or v.numel() == 1}
            scalars.update(timer.read())
            scalars["train/lr"] = student.get_lr()[0]
            scalars["train/samples_per_s"] = samples_since / max(elapsed, 1e-9)
            scalars["train/skipped_steps"] = skipped_steps
            skips = loader_skip_counts(loader, dev)
            scalars.update(skips)
            monitor.scalars(step, scalars)
            if "train/weights" in logs:
                monitor.histogram(step, "train/weights", logs["train/weights"])
            log(rank, f"step {step}/{t.steps} loss {loss.item():.4f} "
                      f"{scalars['train/samples_per_s']:.0f} samples/s" + skip_summary(skips))
            samples_since, clock = 0, time.perf_counter()
        aside = time.perf_counter()  # validation and checkpoints are not training time
        if step % t.eval_every == 0 or step == t.steps:
            metrics = objective.validate()
            monitor.scalars(step, metrics)
            log(rank, "val " + " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items()))
        if step % t.save_every == 0 or step == t.steps:
            save()
        overhead_s += time.perf_counter() - aside
        if stop.agreed(dev):
            save()
            log(rank, f"stop requested ({stop.reason or 'by another rank'}): checkpoint saved at step "
                      f"{step}; resume with --resume latest")
            return finish(monitor, 0)

    failure.leave_training_loop()
    objective.export(out, rank)
    train_s = time.perf_counter() - loop_start - overhead_s
    if rank == 0:
        write_summary(out / "train_summary.json", stage=t.stage, steps=step, steps_this_run=step - start_step,
                      world_size=world, batch_per_rank=t.batch_size, train_seconds=round(train_s, 2),
                      seconds_per_step=round(train_s / max(1, step - start_step), 4),
                      skipped_steps=skipped_steps, final_val=metrics)
    log(rank, f"done: exported {objective.export_name} to {out / objective.export_name} "
              f"({train_s:.0f} s of training)")
    return finish(monitor, 0)


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
