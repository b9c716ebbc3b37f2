"""Entry point: parse the config, build the pieces, run the loop.

    deepspeed --num_gpus 2 train/run.py --ds ds_configs/zero2.json --stage distill \
        --shards shards/synthetic --teacher runs/teacher/teacher --out runs/dcd

Stages: `teacher` fine-tunes the cross-encoder, `student` trains the contrastive-only baseline,
`distill` (default) trains the student by Dynamic Contrastive Distillation from a frozen teacher.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python train/run.py` and the deepspeed launcher run it as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

# torch 2.13 marks all_gather_into_tensor / reduce_scatter_tensor (called by DeepSpeed) and the
# autograd all_gather of torch.distributed.nn (whose replacement is private) deprecated: one warning
# per call and rank would bury the training log.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")

from train import engine as ds_engine
from train.config import ConfigError, RunConfig, parse_config
from train.data import DataError, load_tokenizer, make_train_loader
from train.monitor import Monitor, StepTimer
from train.objectives import build_objective, validate


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, dev) -> bool:
        """True on every rank when any rank was asked to stop (they must all save together)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=dev)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: all ranks must skip a bad step together."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def main(argv=None) -> int:
    rank, world = ds_engine.init_distributed()
    cfg: RunConfig = parse_config(argv, world_size=world)
    t = cfg.train
    dev = ds_engine.device()
    torch.manual_seed(t.seed + rank)

    ds = ds_engine.read_ds_config(t.ds, world, t.batch_size)
    t.batch_size = ds["train_micro_batch_size_per_gpu"]
    out = Path(t.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")  # the resolved config, beside checkpoints and logs

    objective = build_objective(cfg, ds, dev, rank, world)
    student = objective.engine
    ckpt_dir = out / "checkpoints"
    step, data_batches, bad_in_a_row, skipped_steps = 0, 0, 0, 0
    if t.resume:
        state = ds_engine.load_checkpoint(student, ckpt_dir, t.resume)
        step, data_batches = state["step"], state["data_batches"]
        skipped_steps = state.get("skipped_steps", 0)
        log(rank, f"resumed from {ckpt_dir} at step {step}")

    tokenizer = objective.data_tokenizer
    loader = make_train_loader(
        cfg.data.shards, cfg.data.train_split, batch_size=t.batch_size,
        image_size=cfg.data.image_size, tokenizer=tokenizer, max_length=cfg.data.max_length,
        num_workers=cfg.data.num_workers, rank=rank, world_size=world, seed=t.seed,
        start_batch=data_batches, twins_in_batch=cfg.data.twins_in_batch)
    monitor = Monitor(out / "tb", enabled=rank == 0)
    monitor.text(step, "config", "```\n" + (out / "config.json").read_text() + "\n```"
                 if rank == 0 else "")
    timer = StepTimer(ds_engine.accelerator().synchronize)
    stop = StopRequest()
    batches = iter(loader)
    samples_since, clock = 0, time.perf_counter()
    loop_start, overhead_s, start_step, metrics = time.perf_counter(), 0.0, step, {}
    log(rank, f"stage {t.stage}: {t.steps} steps, {world} rank(s) x batch {t.batch_size}, "
              f"ZeRO-{ds_engine.zero_stage(ds)}, out {out}")

    def save():
        ds_engine.save_checkpoint(student, ckpt_dir, step, keep=t.keep_checkpoints, client_state={
            "step": step, "data_batches": data_batches, "skipped_steps": skipped_steps})

    while step < t.steps:
        with timer.section("step"):
            with timer.section("data"):
                batch = next(batches)
                data_batches += 1
            loss, logs = objective.forward(batch, timer)
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
                              f"(--max-bad-steps {t.max_bad_steps}); checkpoint saved at step {step}")
                    return finish(monitor, 3)
                continue
            bad_in_a_row = 0
            with timer.section("backward"):
                student.backward(loss)
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
            scalars.update(loader_skip_counts(loader))
            monitor.scalars(step, scalars)
            if "train/weights" in logs:
                monitor.histogram(step, "train/weights", logs["train/weights"])
            log(rank, f"step {step}/{t.steps} loss {loss.item():.4f} "
                      f"{scalars['train/samples_per_s']:.0f} samples/s")
            samples_since, clock = 0, time.perf_counter()
        aside = time.perf_counter()  # validation and checkpoints are not training time
        if step % t.eval_every == 0 or step == t.steps:
            metrics = validate(objective, cfg)
            monitor.scalars(step, metrics)
            log(rank, "val " + " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items()))
        if step % t.save_every == 0 or step == t.steps:
            save()
        overhead_s += time.perf_counter() - aside
        if stop.agreed(dev):
            save()
            log(rank, f"stop requested: checkpoint saved at step {step}; resume with --resume latest")
            return finish(monitor, 0)

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


def loader_skip_counts(loader) -> dict:
    """Corrupt samples this rank's loader skipped so far: `data/skipped` and one tag per reason."""
    counts = {f"data/skipped_{reason}": float(n) for reason, n in loader.skipped.items()}
    counts["data/skipped"] = float(sum(loader.skipped.values()))
    return counts


def write_summary(path: Path, **values) -> None:
    """Steps, training seconds and the last validation, for tools that compare runs (ablate, pipeline)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)


def finish(monitor: Monitor, code: int) -> int:
    monitor.close()
    ds_engine.shutdown_distributed()
    return code


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[dcd] {message}", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
