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
from train.distill.stored import EmbeddedCandidates, StoredSignals, stored_dcd_loss
from train.eval_split import read_eval_split
from train.evaluation import embed_images, embed_texts, teacher_binding_scores
from train.metrics import binding_accuracy, binding_accuracy_from_scores, retrieval_metrics
from train.models.presets import build_student, build_teacher, load_student
from train.signals import SignalsError, check_covers, load_split
from train.models.teacher_training import teacher_matching_loss
from train.pictures import ranking_picture
from train.validation_source import validation_source


# The validation picture of what the teacher ranked: queries shown, student proposals per query.
RANKING_QUERIES = 3
RANKING_CANDIDATES = 5

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
        self.validation = validation_source(cfg)  # the val split, a held-out slice of train, or none
        self._val_split = None

    def validation_split(self):
        """The small validation gallery, read once."""
        if self._val_split is None:
            cfg, source = self.cfg, self.validation
            self._val_split = read_eval_split(cfg.data.shards, source.split, image_size=cfg.data.image_size,
                                              max_images=source.images)
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

    def pictures(self, split) -> dict:
        """TensorBoard pictures at each validation, tag -> PIL picture; every rank runs it (the
        models' forward passes must be the same on all ranks under ZeRO-3)."""
        return {}

    def projection(self, split):
        """(vectors, metadata rows, header, float thumbnails) for TensorBoard's projector at the end,
        or None; every rank runs it."""
        return None

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

    @torch.no_grad()
    def projection(self, split):
        """Each validation image and its first caption, in one space: the projector shows how close
        the student puts a picture to what is said of it."""
        first = [split.captions_of(i)[0] for i in range(split.num_images)]
        vectors = torch.cat([embed_images(self.model, split.pixels), embed_texts(self.model, first)])
        metadata = [["image", c] for c in first] + [["caption", c] for c in first]
        pictures = split.pixels.float() / 255.0
        return vectors, metadata, ["kind", "caption"], torch.cat([pictures, torch.ones_like(pictures)])


def distill_ramp(warmup_steps: int, step: int) -> float:
    """Weight of the distillation terms at `step`: linear from 1/warmup_steps to 1 over the first
    warmup_steps steps (InfoNCE is full from the start), 1 when warmup_steps is 0."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


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

        distill_weight = distill_ramp(self.cfg.distill.distill_warmup_steps, step)
        with timer.section("loss"):
            loss, logs = dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["pixels"],
                                  teacher_text, teacher_score, self.comm, self.dcd,
                                  distill_weight=distill_weight)
        logs = _train_logs(logs, loss)
        logs["train/distill_weight"] = distill_weight
        logs["train/teacher_params_local"] = float(self.teacher_params_local)
        logs["train/teacher_params_total"] = float(self.teacher_params_total)
        return loss, logs


    @torch.no_grad()
    def pictures(self, split) -> dict:
        """What the teacher ranked: for the first few validation images, the student's top captions
        of the gallery, in the teacher's order, with both models' view of each."""
        queries = min(RANKING_QUERIES, split.num_images)
        similarity = embed_images(self.model, split.pixels[:queries]) @ embed_texts(self.model, split.captions).t()
        proposals = similarity.topk(min(RANKING_CANDIDATES, len(split.captions)), dim=1).indices
        m = proposals.shape[1]
        tokens = {k: v.to(self.dev) for k, v in
                  self.teacher.tokenize([split.captions[t] for t in proposals.flatten().tolist()]).items()}
        scores = self.teacher_engine(self.teacher.preprocess_images(split.pixels[:queries].to(self.dev)),
                                     tokens["input_ids"], tokens["attention_mask"],
                                     torch.arange(queries, device=self.dev).repeat_interleave(m),
                                     torch.arange(queries * m, device=self.dev)).view(queries, m).float().cpu()
        rows = []
        for q in range(queries):
            order = scores[q].argsort(descending=True).tolist()
            texts = [int(proposals[q, o]) for o in order]
            rows.append({"pixels": split.pixels[q], "captions": [split.captions[t] for t in texts],
                         "teacher": [float(scores[q, o]) for o in order], "student_rank": [o + 1 for o in order],
                         "own": [int(split.caption_image_index[t]) == q for t in texts]})
        return {"val/teacher_ranking": ranking_picture(rows)}


class StoredDistillObjective(StudentObjective):
    """DCD from stored teacher signals (`--teacher-signals PATH`, tools/score_teacher.py): the same
    objective as DistillObjective with the teacher's scores read from the table, no teacher in the
    step; batches are composed from the distilled queries and their stored candidates
    (train/clustered.py). The signals are checked against the shards, teacher and proposer first."""

    def __init__(self, cfg: RunConfig, ds: dict, dev, rank: int, world: int):
        super().__init__(cfg, ds, dev, rank, world)
        d = cfg.distill
        signals, self.manifest = load_split(d.teacher_signals, cfg.data.train_split, cfg.data.shards,
                                            _fingerprint_if_present(cfg.model.teacher, build_teacher, cfg),
                                            None)
        _check_proposer(self.manifest, d.teacher_signals)
        self.split = read_eval_split(cfg.data.shards, cfg.data.train_split, image_size=cfg.data.image_size)
        same_rows = (signals.image_ids.shape == self.split.image_ids.shape
                     and torch.equal(signals.image_ids, self.split.image_ids)
                     and signals.caption_image.shape[0] == self.split.num_captions)
        if not same_rows:
            raise SignalsError(f"{d.teacher_signals}: rows of split '{cfg.data.train_split}' differ from "
                               f"{cfg.data.shards}; score it again")
        self.dcd = cfg.distill.dcd_config()
        check_covers(signals, self.dcd.directions, self.dcd.candidates, d.teacher_signals)
        self.signals = StoredSignals(*(t.to(dev) for t in signals))
        batch = ds["train_micro_batch_size_per_gpu"]
        self.embedded = d.stored_batches == "embedded"
        if self.embedded:  # the first distill_queries rows of a random batch, as online
            self.queries = min(self.dcd.distill_queries or batch, batch)
        else:  # the seed queries of a clustered batch are the rows dcd_loss distils: its first distill_queries
            self.queries = min(self.dcd.distill_queries or batch // 4, batch // 2) or 1
        self.dcd.distill_queries = self.queries

    def make_train_loader(self, start_batch: int):
        from train.clustered import ClusteredBatches, EmbeddedCandidateBatches
        t, data = self.cfg.train, self.cfg.data
        args = (self.split, StoredSignals(*(x.cpu() for x in self.signals)), t.batch_size, self.queries, self.rank,
                self.world, t.seed, start_batch, self.data_tokenizer, data.max_length, self.dcd.directions,
                self.dcd.candidates)
        if self.embedded:  # the teacher's top K are the set, unless likely false negatives drop some of them
            kept = self.dcd.hard_negatives if self.dcd.false_negative_margin is None else self.dcd.candidates
            return EmbeddedCandidateBatches(*args, hard_negatives=kept)
        return ClusteredBatches(*args)

    def embed_with_candidates(self, batch: dict, timer):
        """The batch's embeddings, and (embedded mode) its candidates' in the same engine call: the
        towers encode images and captions apart, so the extra rows only lengthen each side."""
        if not self.embedded:
            return (*self.embed(batch, timer), None)
        candidate_inputs = dict(pixels=batch["candidate_pixels"], input_ids=batch["candidate_input_ids"],
                                attention_mask=batch["candidate_attention_mask"])
        if not self.cfg.distill.stored_candidate_grad:
            # keys without gradient: their backward was half a stored step (docs/RESULTS.md)
            image_emb, text_emb, scale = self.embed(batch, timer)
            with torch.no_grad():
                candidate_images, candidate_texts, _ = self.embed(candidate_inputs, timer)
        else:
            B, n_pixels = batch["pixels"].shape[0], batch["candidate_pixels"].shape[0]
            joined = {k: torch.cat([batch[k], candidate_inputs[k]]) for k in candidate_inputs}
            image_emb, text_emb, scale = self.embed(joined, timer)
            image_emb, candidate_images = image_emb[:B], image_emb[B:B + n_pixels]
            text_emb, candidate_texts = text_emb[:B], text_emb[B:]
        candidates = EmbeddedCandidates(batch["candidate_caption_rows"], candidate_texts,
                                        batch["candidate_image_rows"], candidate_images)
        return image_emb, text_emb, scale, candidates

    def forward(self, batch: dict, timer, step: int):
        batch = _to(batch, self.dev)
        image_emb, text_emb, scale, candidates = self.embed_with_candidates(batch, timer)
        distill_weight = distill_ramp(self.cfg.distill.distill_warmup_steps, step)
        with timer.section("loss"):
            loss, logs = stored_dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["caption_rows"],
                                         self.signals, self.comm, self.dcd, distill_weight=distill_weight,
                                         embedded=candidates)
        logs = _train_logs(logs, loss)
        logs["train/distill_weight"] = distill_weight
        return loss, logs


def _fingerprint_if_present(spec, build, cfg: RunConfig):
    """The fingerprint of the configured teacher, or None when the spec names nothing loadable (the
    default teacher of a run that only has stored signals: the manifest names the teacher then)."""
    from train.evaluation import model_fingerprint
    if spec == DEFAULT_TEACHER and not Path(DEFAULT_TEACHER).exists():
        return None
    return model_fingerprint(build(spec, tokenizer_dir=tokenizer_dir(cfg)))


def _check_proposer(manifest: dict, folder) -> None:
    """A proposer saved in a folder must still be the one that proposed (a retrained baseline is not)."""
    from train.evaluation import model_fingerprint
    proposer = manifest.get("proposer", {})
    spec = proposer.get("spec")
    if spec and Path(spec).is_dir() and model_fingerprint(load_student(spec)) != proposer.get("fingerprint"):
        raise SignalsError(f"{Path(folder) / 'manifest.json'}: proposer {spec} changed since it was "
                           f"scored; score it again")


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
    if cfg.distill.teacher_signals:
        return StoredDistillObjective(cfg, ds, dev, rank, world)
    if cfg.model.teacher == DEFAULT_TEACHER and not Path(DEFAULT_TEACHER).exists():
        raise ConfigError(missing_default_teacher())
    return DistillObjective(cfg, ds, dev, rank, world)
