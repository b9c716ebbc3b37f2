"""What one training step computes, per stage: the model it trains, its loss, its validation, its export.

- `teacher`: the cross-encoder fine-tuned with a matching loss over hard negatives.
- `student`: the contrastive-only dual encoder (symmetric InfoNCE over the cross-rank pool).
- `distill`: the dual encoder trained by DCD from a frozen teacher (ZeRO-3 inference engine).
The loop in train/run.py is the same for all three; only these objects differ.
"""
from __future__ import annotations

from pathlib import Path

import torch

from train import engine as ds_engine
from train import failure
from train.config import DEFAULT_TEACHER, ConfigError, RunConfig, missing_default_teacher
from train.distill.dcd import contrastive_loss, dcd_loss
from train.distill.gather import SingleProcess, TorchDistributed
from train.eval_split import read_eval_split
from train.evaluation import embed_images, embed_texts, teacher_binding_scores
from train.metrics import binding_accuracy, binding_accuracy_from_scores, retrieval_metrics
from train.models.presets import build_student, build_teacher, load_student
from train.models.teacher_training import teacher_matching_loss

DEFAULT_IMAGE_SIZE = 64  # the loader's size when no model names its own


def _to(batch: dict, dev) -> dict:
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def tokenizer_dir(cfg: RunConfig) -> Path | None:
    folder = Path(cfg.data.shards) / "tokenizer"
    return folder if folder.is_dir() else None


class TimedCollectives:
    """Charges every collective of the loss to the step timer's `gather` section."""

    def __init__(self, comm):
        self.comm, self.timer = comm, None

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def _timed(self, name, *args, **kwargs):
        with self.timer.section("gather"):
            return getattr(self.comm, name)(*args, **kwargs)

    def all_gather_with_grad(self, *args, **kwargs):
        return self._timed("all_gather_with_grad", *args, **kwargs)

    def all_gather_no_grad(self, *args, **kwargs):
        return self._timed("all_gather_no_grad", *args, **kwargs)

    def all_reduce_sum(self, *args, **kwargs):
        return self._timed("all_reduce_sum", *args, **kwargs)

    def all_to_all(self, *args, **kwargs):
        return self._timed("all_to_all", *args, **kwargs)


class Objective:
    """What the loop in train/run.py needs of a stage: `engine` (the DeepSpeed engine trained),
    `data_tokenizer`, `forward(batch, timer, step) -> (loss, logs)`, `validate() -> val/* metrics`,
    `export(out, rank)`. Subclasses set `model`, `engine` and `data_tokenizer` and implement
    `forward` and `metrics(split)`."""

    export_name = ""

    def __init__(self, cfg: RunConfig, dev, rank: int, world: int):
        self.cfg, self.dev, self.rank, self.world = cfg, dev, rank, world
        self._val_split = None

    def validation_split(self):
        """The small validation gallery, read once."""
        if self._val_split is None:
            cfg = self.cfg
            self._val_split = read_eval_split(cfg.data.shards, cfg.data.val_split, image_size=cfg.data.image_size,
                                              max_images=cfg.train.eval_images)
        return self._val_split

    @torch.no_grad()
    def validate(self) -> dict:
        """val/* metrics on the validation gallery. Every rank computes the same numbers: with ZeRO-3
        the parameters are partitioned, so all ranks must run the same forward passes anyway, and a
        few hundred images cost well under a second."""
        failure.fault_point("validation")
        return self.metrics(self.validation_split())

    def metrics(self, split) -> dict:
        raise NotImplementedError

    def export(self, out: Path, rank: int) -> None:
        ds_engine.export_pretrained(self.model, out / self.export_name, rank)

    def pixel_models(self) -> list:
        """Every model that reads the loader's pixels (each resizes them to its own size)."""
        return [self.model]


class StudentObjective(Objective):
    """Shared by `student` and `distill`: a DualEncoder under a DeepSpeed training engine."""

    export_name = "student"

    def __init__(self, cfg: RunConfig, ds: dict, dev, rank: int, world: int, teacher=None):
        super().__init__(cfg, dev, rank, world)
        t = cfg.train
        model = build_student(cfg.model.student, tokenizer_dir=tokenizer_dir(cfg), teacher=teacher,
                              tokenizer=cfg.model.tokenizer)
        self.model = model
        self.engine = ds_engine.build_student_engine(
            model, ds, t.lr, t.weight_decay, t.warmup_steps, t.steps, t.schedule)
        self.comm = TimedCollectives(TorchDistributed() if world > 1 else SingleProcess())
        self.data_tokenizer = model.tokenizer

    def embed(self, batch: dict, timer):
        self.comm.timer = timer
        with timer.section("student"):
            pixel_values = self.model.preprocess_images(batch["pixels"])
            embedded = self.engine(pixel_values, batch["input_ids"], batch["attention_mask"],
                                   return_scale=True)
        failure.fault_point("forward")
        return embedded

    def forward(self, batch: dict, timer, step: int):
        batch = _to(batch, self.dev)
        image_emb, text_emb, scale = self.embed(batch, timer)
        with timer.section("loss"):
            loss, logs = contrastive_loss(image_emb, text_emb, scale, batch["image_ids"], self.comm)
        return loss, _train_logs(logs, loss)

    def metrics(self, split) -> dict:
        """Recall@K and RSUM over the gallery, and binding accuracy when it has twins."""
        scores = embed_images(self.model, split.pixels) @ embed_texts(self.model, split.captions).t()
        result = {f"val/{k}": float(v) for k, v in retrieval_metrics(scores, split.caption_image_index).items()}
        acc = binding_accuracy_from_scores(scores, split.caption_image_index, split.twin_index)
        if acc is not None:
            result["val/binding_acc"] = acc
        return result


def build_teacher_aside(spec, tokenizer_folder, tokenizer=None):
    """The teacher, built with the global random state set aside and restored afterwards.

    Building a teacher draws random numbers (its modules are initialised before its weights are
    loaded); drawn from the global state they would give the distilled student another
    initialisation than the contrastive student's with the same seed, a confound in every
    comparison of the two stages (measured: different weights before this, equal after)."""
    with torch.random.fork_rng(devices=[]):
        return build_teacher(spec, tokenizer_dir=tokenizer_folder, tokenizer=tokenizer)


class DistillObjective(StudentObjective):
    """DCD: the student proposes hard candidates from the pool, the frozen teacher ranks them."""

    def __init__(self, cfg: RunConfig, ds: dict, dev, rank: int, world: int):
        teacher = build_teacher_aside(cfg.model.teacher, tokenizer_dir(cfg), cfg.model.tokenizer)
        super().__init__(cfg, ds, dev, rank, world, teacher=teacher)
        self.teacher = teacher
        self.teacher_engine = ds_engine.build_teacher_engine(teacher, ds, cfg.model.teacher_zero)
        self.dcd = cfg.distill.dcd_config()
        self.teacher_params_local = ds_engine.local_parameter_elements(teacher)
        self.teacher_params_total = ds_engine.total_parameter_elements(teacher)

    def pixel_models(self) -> list:
        return [self.teacher, self.model]

    def forward(self, batch: dict, timer, step: int):
        batch = _to(batch, self.dev)
        image_emb, text_emb, scale = self.embed(batch, timer)
        # The teacher's own tokenizer and max length; dcd_loss pads the token tensors to one length
        # across ranks before candidates move between them.
        teacher_text = {k: v.to(self.dev) for k, v in self.teacher.tokenize(batch["captions"]).items()}

        def teacher_score(raw_images, raw_texts, image_index, text_index):
            with timer.section("teacher"), torch.no_grad():
                failure.fault_point("teacher")
                pixel_values = self.teacher.preprocess_images(raw_images)
                return self.teacher_engine(pixel_values, raw_texts["input_ids"],
                                           raw_texts["attention_mask"], image_index, text_index)

        ramp = self.cfg.distill.distill_warmup_steps
        distill_weight = min(1.0, (step + 1) / ramp) if ramp > 0 else 1.0
        with timer.section("loss"):
            loss, logs = dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["pixels"],
                                  teacher_text, teacher_score, self.comm, self.dcd,
                                  distill_weight=distill_weight)
        logs = _train_logs(logs, loss)
        logs["train/distill_weight"] = distill_weight
        logs["train/teacher_params_local"] = float(self.teacher_params_local)
        logs["train/teacher_params_total"] = float(self.teacher_params_total)
        return loss, logs


class TeacherObjective(Objective):
    """Fine-tunes the cross-encoder (no pretrained teacher can be downloaded on our machines)."""

    export_name = "teacher"

    def __init__(self, cfg: RunConfig, ds: dict, dev, rank: int, world: int):
        super().__init__(cfg, dev, rank, world)
        t = cfg.train
        self.model = build_teacher(cfg.model.teacher, tokenizer_dir=tokenizer_dir(cfg), tokenizer=cfg.model.tokenizer)
        self.engine = ds_engine.build_student_engine(
            self.model, ds, t.lr, t.weight_decay, t.warmup_steps, t.steps, t.schedule)
        self.loss_cfg = cfg.teacher_loss
        # frozen, outside DeepSpeed: it only ranks the batch for the negatives' sampling
        negatives_student = self.loss_cfg.negatives_student
        self.negatives_student = (load_student(negatives_student).to(dev).eval().requires_grad_(False)
                                  if negatives_student else None)
        self.data_tokenizer = self.model.tokenizer

    def pixel_models(self) -> list:
        return [self.model] + ([self.negatives_student] if self.negatives_student is not None else [])

    def forward(self, batch: dict, timer, step: int):
        batch = _to(batch, self.dev)
        similarity = None
        if self.negatives_student is not None:
            with torch.no_grad():
                student = self.negatives_student
                tokens = student.tokenize(list(batch["captions"]))
                images, texts = student(student.preprocess_images(batch["pixels"]),
                                        tokens["input_ids"].to(self.dev), tokens["attention_mask"].to(self.dev))
                similarity = images @ texts.t()
        with timer.section("teacher"):
            result = teacher_matching_loss(self.engine, batch, self.loss_cfg, similarity=similarity)
        loss = result["loss"]
        return loss, {f"train/{k}": v.detach() if isinstance(v, torch.Tensor) else v
                      for k, v in result.items()}

    def metrics(self, split) -> dict:
        """Binding accuracy: does each caption's own image outscore its twin."""
        own, twin = teacher_binding_scores(self.model, split)
        acc = binding_accuracy(own, twin)
        return {} if acc is None else {"val/binding_acc": acc}


def _train_logs(logs: dict, loss: torch.Tensor) -> dict:
    out = {"train/loss": loss.detach()}
    for key, value in logs.items():
        if key == "weights":
            out["train/weights"] = value
        elif isinstance(value, torch.Tensor):
            out[f"train/{key}"] = value.detach()
        else:
            out[f"train/{key}"] = value
    return out


def loader_image_size(models) -> int:
    """The loader's pixel size when the user set none: the largest the models read at, so that no
    model upsamples pixels the loader shrank (a 384 px ViLT teacher beside a 224 px CLIP student
    reads 384 px crops; the project's own 64 px models keep 64)."""
    sizes = [int(m.image_size) for m in models if getattr(m, "image_size", None)]
    return max(sizes) if sizes else DEFAULT_IMAGE_SIZE


def choose_image_size(cfg: RunConfig, objective) -> str | None:
    """Fill cfg.data.image_size from the models when the user set none; the log line saying so."""
    if cfg.data.image_size is not None:
        return None
    models = objective.pixel_models()
    cfg.data.image_size = loader_image_size(models)
    sizes = ", ".join(f"{type(m).__name__} {getattr(m, 'image_size', '?')}" for m in models)
    return (f"image size {cfg.data.image_size} px: the largest the models read at ({sizes}); "
            f"--image-size sets it")


def build_objective(cfg: RunConfig, ds: dict, dev, rank: int, world: int):
    stage = cfg.train.stage
    if stage == "teacher":
        return TeacherObjective(cfg, ds, dev, rank, world)
    if stage == "student":
        return StudentObjective(cfg, ds, dev, rank, world)
    if cfg.model.teacher == DEFAULT_TEACHER and not Path(DEFAULT_TEACHER).exists():
        raise ConfigError(missing_default_teacher())
    return DistillObjective(cfg, ds, dev, rank, world)
