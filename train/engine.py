"""DeepSpeed set-up: the student's training engine, the teacher's inference engine, checkpoints, export.

Everything device-specific goes through DeepSpeed's accelerator abstraction, so the same code runs on
CPU ranks over gloo here and on CUDA ranks over NCCL on a cluster.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
from pathlib import Path

import torch

from train import comm, failure
from train.config import ConfigError, read_json_object

ZERO_STAGES = (0, 1, 2, 3)


# ----------------------------------------------------------------------------- device

def device() -> torch.device:
    acc = comm.accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc.set_device(local_rank)
    return torch.device(acc.device_name(local_rank))


# ----------------------------------------------------------------------------- ds configs

def read_ds_config(path: str | os.PathLike, world_size: int = 1, micro_batch: int | None = None) -> dict:
    """Load and check a DeepSpeed JSON config; errors are one line naming the file and field.

    `micro_batch` (the trainer's --batch-size) replaces the file's micro batch. The global
    `train_batch_size`, when the file gives one, must equal micro x accumulation x world.
    """
    path = Path(path)
    ds = read_json_object(path, "DeepSpeed config")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: field 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"{path}: field 'zero_optimization.stage' is {stage!r}; "
                          f"use one of {ZERO_STAGES}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: field '{key}' is set by the trainer's flags "
                              "(--lr, --weight-decay, --warmup-steps, --schedule); remove it")
    accumulation = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(accumulation, int) or accumulation < 1:
        raise ConfigError(f"{path}: field 'gradient_accumulation_steps' must be a positive integer")
    if micro_batch is None:
        micro_batch = ds.get("train_micro_batch_size_per_gpu")
        if micro_batch is None and "train_batch_size" in ds:
            total = ds["train_batch_size"]
            if total % (accumulation * world_size):
                raise ConfigError(
                    f"{path}: field 'train_batch_size' ({total}) is not divisible by "
                    f"gradient_accumulation_steps x world size ({accumulation} x {world_size})")
            micro_batch = total // (accumulation * world_size)
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise ConfigError(f"{path}: field 'train_micro_batch_size_per_gpu' must be a positive integer")
    if "train_batch_size" in ds and ds["train_batch_size"] != micro_batch * accumulation * world_size:
        raise ConfigError(
            f"{path}: field 'train_batch_size' ({ds['train_batch_size']}) != micro batch x "
            f"accumulation x world size ({micro_batch} x {accumulation} x {world_size})")
    check_precision(ds, path)
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["train_batch_size"] = micro_batch * accumulation * world_size
    return ds


def check_precision(ds: dict, path: Path, has_gpu: bool | None = None) -> None:
    """Refuse up front a precision block this machine cannot run: DeepSpeed's bf16 / fp16 engines
    cast the weights, and on CPU the first convolution fails deep inside a step (a traceback per
    rank). bf16 compute on CPU is `torch_autocast` (ds_configs/zero2_bf16.json)."""
    if has_gpu is None:
        has_gpu = torch.cuda.is_available()
    for precision in ("bf16", "fp16"):
        block = ds.get(precision)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: field '{precision}' must be an object like {{\"enabled\": false}}")
        enabled = block.get("enabled", False)
        if enabled not in (True, False, "auto"):
            raise ConfigError(f"{path}: field '{precision}.enabled' is {enabled!r}; use true or false")
        if enabled is True and not has_gpu:
            raise ConfigError(f"{path}: field '{precision}.enabled' is true, but this machine has no GPU "
                              f"and {precision} weights fail on CPU; set it false, or use "
                              f"\"torch_autocast\": {{\"enabled\": true, \"dtype\": \"bfloat16\"}} "
                              f"(ds_configs/zero2_bf16.json)")


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def teacher_ds_config(student_ds: dict, stage: int) -> dict:
    """The frozen teacher's inference config, derived from the student's.

    Same precision and micro batch, no optimizer, no clipping; ZeRO-3 partitions its parameters
    across ranks (each rank holds ~1/world of them and gathers a layer's worth on use).
    """
    ds = {
        "train_micro_batch_size_per_gpu": student_ds["train_micro_batch_size_per_gpu"],
        "train_batch_size": student_ds["train_batch_size"],
        "gradient_accumulation_steps": student_ds.get("gradient_accumulation_steps", 1),
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1_000_000_000,
    }
    for precision in ("bf16", "fp16", "torch_autocast"):  # torch_autocast: bf16 compute, fp32 weights
        if precision in student_ds:
            ds[precision] = copy.deepcopy(student_ds[precision])
    if stage == 3:
        student_zero = student_ds.get("zero_optimization", {})
        ds["zero_optimization"].update({
            "stage3_param_persistence_threshold": 0,  # partition even small tensors
            "stage3_prefetch_bucket_size": student_zero.get("stage3_prefetch_bucket_size", 50_000_000),
        })
        if "offload_param" in student_zero:
            ds["zero_optimization"]["offload_param"] = copy.deepcopy(student_zero["offload_param"])
    return ds


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with no decay on biases, norms and the temperature (decaying them only hurts).

    A torch optimizer rather than DeepSpeed's fused ones: those compile on first use (~40 s on CPU).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up, then cosine or linear decay to zero at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_student_engine(model, ds: dict, lr: float, weight_decay: float, warmup_steps: int,
                         total_steps: int, schedule: str):
    deepspeed = comm.import_deepspeed()
    optimizer = build_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds)
    return engine


def build_teacher_engine(teacher, student_ds: dict, stage: int):
    """Wrap the frozen teacher as an inference-only DeepSpeed engine (no optimizer)."""
    deepspeed = comm.import_deepspeed()
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=teacher, config=teacher_ds_config(student_ds, stage))
    engine.eval()
    if hasattr(teacher, "agree_slice_count"):
        # partitioned parameters are gathered at every submodule call: the ranks' slice counts must
        # agree (train/models/film.py), and the model leaves talking to other ranks to this layer
        teacher.agree_slice_count = comm.max_over_ranks
    return engine


def local_parameter_elements(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: a ZeRO-3 partition (ds_tensor) or the full tensor."""
    total = 0
    for param in module.parameters():
        partition = getattr(param, "ds_tensor", None)
        total += partition.numel() if partition is not None else param.numel()
    return total


def total_parameter_elements(module: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


# ----------------------------------------------------------------------------- checkpoints

LATEST = "latest"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict,
                    keep: int = 2) -> str:
    """Save a DeepSpeed checkpoint `step{N}` and only then point `latest` at it.

    DeepSpeed writes `latest` from rank 0 as soon as rank 0's own files are done; a rank that dies
    later would leave `latest` naming a half-written checkpoint. So DeepSpeed's pointer is turned off,
    every rank finishes (its closing barrier), and rank 0 switches the pointer atomically. Older
    checkpoints beyond `keep` are removed after the switch, never before.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step}"
    if latest_tag(ckpt_dir) == tag:
        # This step is already saved, complete (a stop request or a bad-step stop right after a
        # periodic save): never rewrite in place the checkpoint `latest` names.
        return tag
    if engine.global_rank == 0 and (ckpt_dir / tag).exists():
        shutil.rmtree(ckpt_dir / tag)  # what a save that crashed at this step left behind
    comm.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    failure.fault_point("save")  # tests: a save that fails after its files, before `latest` moves
    comm.barrier()
    if engine.global_rank == 0:
        _write_atomic(ckpt_dir / LATEST, tag)
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()),
                      key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
        for old in tags[:-keep] if keep > 0 else []:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return tag


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def load_checkpoint(engine, ckpt_dir: str | os.PathLike, tag: str) -> dict:
    """Restore model, optimizer, scheduler and return the client state saved with them."""
    if tag == LATEST:
        resolved = latest_tag(ckpt_dir)
        if resolved is None:
            raise ConfigError(f"{ckpt_dir}: no complete checkpoint to resume from (no '{LATEST}')")
        tag = resolved
    if not (Path(ckpt_dir) / tag).is_dir():
        raise ConfigError(f"{ckpt_dir}/{tag}: checkpoint not found")
    with weights_only_checkpoint_loading():
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ConfigError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
    return client_state or {}


class weights_only_checkpoint_loading:
    """Make DeepSpeed read its checkpoint files with torch.load(weights_only=True).

    DeepSpeed's torch checkpoint engine unpickles arbitrary objects. Its own checkpoints hold only
    tensors, containers and a few plain DeepSpeed/PyTorch types, which are allow-listed here; anything
    else in a checkpoint file fails to load instead of running code.
    """

    def __enter__(self):
        from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce
        self._module = tce
        self._original = tce.TorchCheckpointEngine.load

        def load(engine_self, path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

        tce.TorchCheckpointEngine.load = load
        torch.serialization.add_safe_globals(_deepspeed_safe_globals())
        return self

    def __exit__(self, *exc):
        self._module.TorchCheckpointEngine.load = self._original
        return False


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed puts in its checkpoints (enums, loss-scaler state)."""
    import argparse
    import collections
    safe = [argparse.Namespace, collections.OrderedDict, collections.defaultdict, set]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        safe.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        safe += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        safe.append(fragment_address)
    except ImportError:
        pass
    return safe


# ----------------------------------------------------------------------------- export

def export_pretrained(module: torch.nn.Module, out_dir: str | os.PathLike, rank: int) -> Path:
    """Write `module.save_pretrained(out_dir)` from rank 0, whole even when ZeRO-3 partitioned it.

    Written to a temporary folder and renamed, so a crash never leaves a half-written export where a
    good one was.
    """
    import deepspeed
    out_dir = Path(out_dir)
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    context = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if partitioned
               else contextlib.nullcontext())
    with context:
        failure.fault_point("export")
        if rank == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            module.save_pretrained(tmp)
            old = out_dir.with_name(out_dir.name + ".old")
            if out_dir.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return out_dir
