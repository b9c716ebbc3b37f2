"""Typed run configuration: defaults < JSON file (--config) < command-line flags.

Every field of every section is a flag of its own (`--kd-temperature`, `--batch-size`, ...), so the
command line, a config file and the saved `{out}/config.json` all use the same names. Fields whose
default is None take a stage-dependent value in `resolve()` (a teacher fine-tune wants a higher
learning rate and twins in its batches; distillation does not), and the resolved values are what gets
saved beside the checkpoints, so a run can always be reproduced from its own folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, get_args, get_origin, get_type_hints

from train.distill.dcd import DIRECTIONS, DCDConfig
from train.distill.losses import KD_KINDS, OBJECTIVES, WEIGHTING_SCHEMES
from train.failure import ReportedError
from train.field_comments import field_comments
from train.models.teacher_training import TeacherTrainingConfig

STAGES = ("distill", "student", "teacher")

# Where a run's stages write by default, and so the teacher distillation uses when none is named:
# the one `--stage teacher` (and ./launch.sh) exports.
DEFAULT_RUN = "runs/default"
DEFAULT_OUT = {"teacher": f"{DEFAULT_RUN}/teacher", "student": f"{DEFAULT_RUN}/baseline",
               "distill": f"{DEFAULT_RUN}/dcd"}
DEFAULT_TEACHER = f"{DEFAULT_OUT['teacher']}/teacher"


@dataclass
class DataConfig:
    shards: str = "shards/synthetic"       # folder written by tools/make_shards.py
    train_split: str = "train"
    val_split: str = "val"
    # Pixels the loader crops to; models resize further themselves. None: the larger of the
    # teacher's and the student's own sizes (train/objectives.py loader_image_size), 64 for the
    # project's own models, 384 for a ViLT folder.
    image_size: Optional[int] = None
    num_workers: int = 1                   # loader processes per rank
    max_length: int = 24                   # caption tokens; synthetic captions are <= ~16
    twins_in_batch: Optional[bool] = None  # keep twin scenes in one batch (teacher stage: yes)


@dataclass
class ModelConfig:
    teacher: Optional[str] = None   # preset, saved folder or hub id
    student: str = "student-tiny"   # preset, saved folder, HF dual encoder, or "from-teacher"
    # A tokenizer folder for a pretrained teacher / student saved without one (or replacing its own);
    # never defaulted to the shards' tokenizer, which the model was not trained on.
    tokenizer: Optional[str] = None
    teacher_zero: Optional[int] = None  # 0 or 3; default 3 when the world has more than one rank


@dataclass
class DistillConfig:
    candidates: int = 16                 # M: the student's proposals per query
    hard_negatives: int = 7              # K: the teacher's top-ranked proposals kept
    alpha: float = 0.2                   # share of KD vs hard-negative CE (published code: 0.2)
    kd_temperature: float = 1.0
    kd_loss: str = "kl"                  # kl | mse
    lambda_itc: float = 1.0
    weighting: str = "entropy"           # entropy | wsl | none
    directions: str = "i2t,t2i"
    # Local queries per step and direction that get teacher-ranked negatives (None: all): the
    # teacher's forward dominates a DCD step on CPU; the InfoNCE term covers the whole pool either
    # way. The measurements behind 16: docs/RESULTS.md, "Defaults chosen by measurement".
    distill_queries: Optional[int] = 16
    negatives_from: str = "teacher"      # teacher | random (ablation: KD without teacher ranking)
    # Leave out of the candidate set the proposals the teacher scores within this many logits of
    # the positive, or above it (likely false negatives: train/distill/negatives.py); None = off,
    # the published method. On the synthetic data ~55 captions are true of each of 1,000 images.
    false_negative_margin: Optional[float] = None
    # Steps over which the KD and hard-negative terms ramp linearly from 0 to full weight (InfoNCE
    # is full from the start); 0 = off. From scratch the student's first proposals are random and
    # every DCD run lagged the contrastive one most early on (val 423.5 vs 447.0 at step 200).
    distill_warmup_steps: int = 0
    # What the KD and hard terms are: published (the reference) | listwise (KD to the row-
    # standardised teacher) | denoised (near-positive candidates are extra positives) | margin
    # (KD = Margin-MSE) | margin_floor (one-sided Margin-MSE); train/distill/losses.py OBJECTIVES,
    # docs/RESULTS.md for the ablation.
    objective: str = "published"
    positive_margin: float = 0.0         # the denoised objective's margin, in teacher logits
    # Stored teacher signals (tools/score_teacher.py): the same objective from the stored scores of
    # the proposer's candidates, no teacher forward in the step (train/distill/stored.py).
    teacher_signals: Optional[str] = None
    # How a stored-signal run meets its candidates: "embedded" draws batches as the contrastive run
    # does (random, twins together) and the student embeds each distilled query's kept candidates
    # beside the batch; "clustered" composes batches from the queries and their candidates
    # (train/clustered.py), which cost 17 test RSUM with the distillation weight ramped to ~0
    # (docs/RESULTS.md, "Stored teacher signals").
    stored_batches: str = "embedded"
    # Embedded candidates take gradient as pool keys do online; false: embedded without gradient
    # (only the distilled queries' side learns from their terms): ~1.0x a contrastive step instead
    # of ~1.8x, for ~6 test RSUM over 3 seeds (docs/RESULTS.md, "Session 8").
    stored_candidate_grad: bool = True

    def dcd_config(self) -> DCDConfig:
        """The DCD objective's config: every field the two share, by name, with the directions
        parsed; the fields only a run has (distill_warmup_steps) stay here."""
        shared = {f.name for f in fields(DCDConfig)} & {f.name for f in fields(self)}
        values = {name: getattr(self, name) for name in shared}
        values["directions"] = parse_directions(self.directions)
        return DCDConfig(**values)


def parse_directions(text: str) -> tuple:
    """`"i2t,t2i"` -> ("i2t", "t2i"); a ConfigError naming the field when empty or unknown."""
    directions = tuple(x.strip() for x in text.split(",") if x.strip())
    if not directions or any(x not in DIRECTIONS for x in directions) or len(set(directions)) < len(directions):
        raise ConfigError(f"distill.directions: '{text}' (use i2t, t2i or i2t,t2i)")
    return directions


@dataclass
class TrainConfig:
    stage: str = "distill"
    ds: str = "ds_configs/zero2.json"
    out: Optional[str] = None            # checkpoints, TensorBoard logs, config.json and the export
    steps: Optional[int] = None          # optimizer steps in all (a resumed run goes on to them)
    batch_size: Optional[int] = None     # per rank; overrides the ds config's micro batch
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_steps: Optional[int] = None
    schedule: Optional[str] = None       # cosine | linear (decay after warm-up)
    seed: int = 0
    resume: Optional[str] = None         # "latest" or a checkpoint tag
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 200                # 0: no validation
    eval_images: int = 200               # validation gallery size for val/* during training
    log_every: int = 10
    max_bad_steps: int = 20              # consecutive non-finite losses before the run stops


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher_loss: TeacherTrainingConfig = field(default_factory=TeacherTrainingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)


class ConfigError(ReportedError):
    """A configuration value or file that cannot be used; the message is one line."""


def missing_default_teacher() -> str:
    """What to run first when distillation starts before any teacher was trained."""
    return (f"--teacher {DEFAULT_TEACHER}: not found; run ./launch.sh (or `deepspeed --num_gpus 2 "
            f"train/run.py --stage teacher`) first, or name a preset, a saved folder or a hub id")


# Per-stage values for fields left at None. Teacher numbers are the FiLM recipe measured in
# docs/platform_notes.md; student numbers are the published DCD code's (AdamW, wd 0.01, 10% warm-up).
STAGE_DEFAULTS = {
    # 1,600 steps: the FiLM teacher first passed 85% binding accuracy at ~1,200 (assets/teacher-film).
    "teacher": dict(lr=1e-3, weight_decay=1e-4, warmup_steps=100, schedule="cosine",
                    twins_in_batch=True, batch_size=32, steps=1600),
    # batch_size None: the ds config's train_micro_batch_size_per_gpu decides.
    # Twins in the batch for the students too (NegCLIP's hard negatives; the same stream for the
    # contrastive baseline and DCD): without them the pool never holds the one image a binding-
    # blind student confuses, and no loss can teach binding (docs/RESULTS.md, issue 13).
    "student": dict(lr=1e-3, weight_decay=0.01, warmup_steps=None, schedule="cosine",
                    twins_in_batch=True, batch_size=None, steps=600),
    "distill": dict(lr=1e-3, weight_decay=0.01, warmup_steps=None, schedule="cosine",
                    twins_in_batch=True, batch_size=None, steps=600),
}


def _sections(cfg: RunConfig):
    for f in fields(cfg):
        yield f.name, getattr(cfg, f.name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_index() -> dict:
    """Field name -> (section name, type). Names are unique across sections by design."""
    index = {}
    for section_name, section in _sections(RunConfig()):
        hints = get_type_hints(type(section))
        for f in fields(section):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section_name, hints[f.name])
    return index


def _base_type(tp):
    if get_origin(tp) is not None:  # Optional[X] -> X
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _is_optional(tp) -> bool:
    return get_origin(tp) is not None and type(None) in get_args(tp)


def _none_or(tp):
    """An argparse type for an Optional number: the word none, or a number."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else tp(text)
    parse.__name__ = tp.__name__  # argparse names the type in its error: "invalid int value"
    return parse


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# What --help says of the fields resolve() fills in when they are left at None.
_RESOLVED_DEFAULTS = {
    "out": ", ".join(f"{stage} {DEFAULT_OUT[stage]}" for stage in STAGES),
    "teacher": f"distill {DEFAULT_TEACHER}, teacher film-tiny, student none",
    "teacher_zero": "3 with more than one rank, else 0",
    "image_size": "the largest of the teacher's and the student's own sizes (64 for the project's models)",
}
# What `--flag none` means for the Optional numbers whose default is not None.
_NONE_MEANS = {"distill_queries": "every local query"}
_STAGE_DEFAULT_UNSET = {"warmup_steps": "10% of the steps", "batch_size": "the ds config's micro batch"}


def _default_help(name: str, value) -> str:
    """The default as resolve() sets it: the value, or per stage, or what None means."""
    if value is not None:
        return str(value)
    if name in _RESOLVED_DEFAULTS:
        return _RESOLVED_DEFAULTS[name]
    if name not in STAGE_DEFAULTS[STAGES[0]]:
        return "none"
    stages_of = {}
    for stage in STAGES:
        stage_value = STAGE_DEFAULTS[stage][name]
        stages_of.setdefault(_STAGE_DEFAULT_UNSET[name] if stage_value is None else str(stage_value), []).append(stage)
    if len(stages_of) == 1:
        return next(iter(stages_of))
    return ", ".join(f"{' / '.join(stages)} {text}" for text, stages in stages_of.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/run.py",
        description="Train a dual-encoder student by Dynamic Contrastive Distillation from a "
                    "cross-encoder teacher (stages: teacher fine-tune, contrastive student, distill).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=argparse.SUPPRESS, help="JSON file with any of the sections below "
                        "({\"train\": {...}, \"distill\": {...}}) or flat field names")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher; ignored")
    index = _field_index()
    groups = {}
    for section_name, section in _sections(RunConfig()):
        groups[section_name] = parser.add_argument_group(section_name)
        comments = field_comments(type(section))
        for f in fields(section):
            tp = _base_type(index[f.name][1])
            explained = f"{comments[f.name]} " if f.name in comments else ""
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS,
                          help=f"{explained}(default: {_default_help(f.name, getattr(section, f.name))})"
                          .replace("%", "%%"))
            if tp is bool:
                kwargs["type"] = _parse_bool
                kwargs["metavar"] = "BOOL"
            elif tp in (int, float) and _is_optional(index[f.name][1]):
                kwargs["type"] = _none_or(tp)  # `--distill-queries none`: what a file's null says
                if f.name in _NONE_MEANS:
                    kwargs["help"] = kwargs["help"][:-1] + f"; none: {_NONE_MEANS[f.name]})"
            else:
                kwargs["type"] = tp
            if f.name == "stage":
                kwargs["choices"] = STAGES
            groups[section_name].add_argument(_flag(f.name), **kwargs)
    return parser


# The fields with a fixed set of values: a file's value is checked against them where it is read (the
# error names the file); resolve() checks them again for flags, after stage defaults fill the Nones.
FIELD_CHOICES = {"stage": STAGES, "schedule": ("cosine", "linear"), "weighting": WEIGHTING_SCHEMES,
                 "kd_loss": KD_KINDS, "objective": OBJECTIVES, "negatives_from": ("teacher", "random"),
                 "teacher_zero": (0, 3), "stored_batches": ("embedded", "clustered")}

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def checked_value(name: str, value, tp, origin: str, section: str):
    """A file's value for field `section.name` of type `tp`, or a one-line ConfigError naming both.

    A JSON file has types, so a string where a number belongs ("0.5") is an error, not a guess;
    an integer where a float belongs is the same number. None is allowed for Optional fields."""
    where = f"{origin}: field '{section}.{name}'"
    optional = _is_optional(tp)
    base = _base_type(tp)
    if value is None and optional:
        return value
    exact = type(value) is base or (base is float and type(value) is int)
    if not exact:
        raise ConfigError(f"{where} is {json.dumps(value)} ({type(value).__name__}); "
                          f"expected {_TYPE_NAMES.get(base, base.__name__)}"
                          + (" or null" if optional else ""))
    choices = FIELD_CHOICES.get(name)
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} is {json.dumps(value)}; use {_one_of(tuple(map(str, choices)))}")
    return float(value) if base is float else value


def _apply(cfg: RunConfig, values: dict, origin: str) -> None:
    """Values from a file (checked against each field's type and choices) or from the parsed flags
    (argparse already converted and checked them)."""
    index = _field_index()
    from_flags = origin == "command line"
    for key, value in values.items():
        if key in ("config", "local_rank"):
            continue
        if key in dict(_sections(cfg)) and isinstance(value, dict):  # nested section in a file
            _apply(cfg, value, origin)
            continue
        if key not in index:
            raise ConfigError(f"{origin}: unknown config field '{key}'")
        section_name, tp = index[key]
        if not from_flags:
            value = checked_value(key, value, tp, origin, section_name)
        setattr(getattr(cfg, section_name), key, value)


def resolve(cfg: RunConfig, world_size: int = 1) -> RunConfig:
    """Fill stage-dependent defaults and check values; returns the same object."""
    t, d, m, dist = cfg.train, cfg.data, cfg.model, cfg.distill
    if t.stage not in STAGES:
        raise ConfigError(f"train.stage: '{t.stage}' is not one of {', '.join(STAGES)}")
    defaults = STAGE_DEFAULTS[t.stage]
    for name, value in defaults.items():
        section = d if name == "twins_in_batch" else t
        if getattr(section, name) is None and value is not None:
            setattr(section, name, value)
    if t.warmup_steps is None:  # published recipe: 10% linear warm-up
        t.warmup_steps = max(1, t.steps // 10)
    if t.out is None:
        t.out = DEFAULT_OUT[t.stage]
    if m.teacher is None and t.stage in ("teacher", "distill"):
        m.teacher = "film-tiny" if t.stage == "teacher" else DEFAULT_TEACHER
    if m.teacher_zero is None:
        m.teacher_zero = 3 if world_size > 1 else 0
    if m.teacher_zero not in (0, 3):
        raise ConfigError(f"model.teacher_zero: {m.teacher_zero} (use 0 or 3)")
    if t.schedule not in ("cosine", "linear"):
        raise ConfigError(f"train.schedule: '{t.schedule}' (use cosine or linear)")
    for name, choices in (("weighting", WEIGHTING_SCHEMES), ("kd_loss", KD_KINDS), ("objective", OBJECTIVES),
                          ("negatives_from", ("teacher", "random"))):
        if getattr(dist, name) not in choices:
            raise ConfigError(f"distill.{name}: '{getattr(dist, name)}' (use {_one_of(choices)})")
    if dist.false_negative_margin is not None and dist.negatives_from != "teacher":
        raise ConfigError("distill.false_negative_margin needs negatives_from teacher (the teacher "
                          "decides what is a likely false negative)")
    parse_directions(dist.directions)
    if dist.teacher_signals and dist.negatives_from != "teacher":
        raise ConfigError("distill.teacher_signals stores the teacher's ranking of the proposer's "
                          "candidates: use it with negatives_from teacher")
    tl = cfg.teacher_loss
    if tl.negatives_student is not None and not Path(tl.negatives_student).is_dir():
        raise ConfigError(f"teacher_loss.negatives_student: {tl.negatives_student} is not a saved "
                          f"student folder")
    if tl.random_negatives < 0 or tl.similar_negatives < 0:
        raise ConfigError(f"teacher_loss: random_negatives ({tl.random_negatives}) and "
                          f"similar_negatives ({tl.similar_negatives}) must be >= 0")
    if dist.distill_warmup_steps < 0:
        raise ConfigError(f"distill.distill_warmup_steps: {dist.distill_warmup_steps} (use 0 or more)")
    if dist.hard_negatives > dist.candidates:
        raise ConfigError(f"distill.hard_negatives ({dist.hard_negatives}) must not exceed "
                          f"distill.candidates ({dist.candidates})")
    for name in ("steps", "batch_size", "save_every", "log_every", "eval_images"):
        if getattr(t, name) is not None and getattr(t, name) <= 0:
            raise ConfigError(f"train.{name}: must be positive, got {getattr(t, name)}")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every: must be 0 (no validation) or positive, got {t.eval_every}")
    return cfg


def _one_of(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def read_json_object(path: str | os.PathLike, what: str = "config file") -> dict:
    """A JSON object from a file, or a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return values


def parse_config(argv=None, world_size: int = 1) -> RunConfig:
    """Parse flags (and an optional --config file) into a resolved RunConfig."""
    args = build_parser().parse_args(argv)
    cfg = RunConfig()
    if getattr(args, "config", None):
        _apply(cfg, read_json_object(args.config), str(args.config))
    _apply(cfg, vars(args), "command line")
    return resolve(cfg, world_size)


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Read a saved `{out}/config.json` back (e.g. to evaluate or resume a run)."""
    cfg = RunConfig()
    _apply(cfg, json.loads(Path(path).read_text()), str(path))
    return cfg
