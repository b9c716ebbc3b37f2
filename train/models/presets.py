"""Model specs -> models, in one place: the grammar of `--teacher` / `--student` (parse_spec, which
train/run.py, train/preflight.py and every tool reach through build_teacher / build_student) and the
builders.

    teacher: PRESET (film-tiny, vilt-tiny, vilt-b32) | meter-tiny | meter-clip16-roberta
             | meter-PRESET:PATH.ckpt | PATH.ckpt (= meter-clip16-roberta:PATH.ckpt)
             | scene-oracle:SHARDS | FOLDER (saved by this project, or a transformers ViLT folder)
             | HUB_ID (org/name, tried only when no such path exists; offline: one line)
    student: PRESET (student-tiny) | from-teacher | FOLDER (saved by this project, or a transformers
             CLIPModel / VisionTextDualEncoderModel folder) | HUB_ID

Anything else is a SpecError (a ValueError) of one line. Weights are read only with safetensors
(ours) or transformers' own loaders (safetensors first). A pretrained model reads with its own
tokenizer, or the `tokenizer` folder (--tokenizer) given; presets built from scratch read with the
data tokenizer (`tokenizer_dir`, the shards' tokenizer/).
"""
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from train.models.common import load_tokenizer, read_config
from train.models.hf_dual import HF_STUDENT_LOADERS, load_hf_student
from train.models.student import DualEncoder, student_from_config, student_from_vilt_teacher
from train.models.film import FILM_DEFAULTS, FilmCrossEncoder
from train.models.teacher import TEACHER_BACKENDS
from train.models.vilt import ViltCrossEncoder

# Backends and tower kinds whose modules are imported only when a spec or folder needs them (METER
# pulls in more of transformers), by the name of the backend / the prefix of the tower kind. The
# modules register their classes (register_teacher, register_tower) when imported.
LAZY_TEACHER_MODULES = {"meter": "train.models.meter"}
LAZY_TOWER_MODULES = {"meter": "train.models.meter_student"}
# The METER preset whose weights an official checkpoint holds (a bare PATH.ckpt names it).
METER_CHECKPOINT_PRESET = "meter-clip16-roberta"

# ----------------------------------------------------------------------------------------------
# presets

TEACHER_PRESETS = {
    # docs/platform_notes.md: 91.7% twin accuracy on the synthetic scenes after ~1,000 CPU steps
    "film-tiny": {"backend": "film", **FILM_DEFAULTS},
    # ViLT from scratch on CPU (docs/platform_notes.md: needs the masked-word loss to learn anything)
    "vilt-tiny": {"backend": "vilt", "masked_word_head": True,
                  "vilt_config": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=256, image_size=64, patch_size=16,
                                      max_position_embeddings=40, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)},
    # the architecture of dandelin/vilt-b32 (random init: no hub here)
    "vilt-b32": {"backend": "vilt", "masked_word_head": True,
                 "vilt_config": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072, image_size=384,
                                     patch_size=32, max_position_embeddings=40, hidden_act="gelu",
                                     layer_norm_eps=1e-12, qkv_bias=True)},
}

STUDENT_PRESETS = {
    # Sizes chosen by measurement: docs/RESULTS.md, "Defaults chosen by measurement".
    # The 8x8 map is flattened (through a 1x1 conv) so where each colour and shape sits survives.
    "student-tiny": {"embed_dim": 128, "image_size": 64, "max_length": 48,
                     "image_tower": {"kind": "cnn", "modality": "image", "channels": [16, 32, 64, 64],
                                     "strides": [2, 2, 2, 1], "pool": "flatten", "flatten_channels": 16,
                                     "width": 256},
                     # A bi-GRU, not a transformer: on the specific captions, twins in every batch,
                     # 800 steps, it reached 77% val binding vs 57% (docs/RESULTS.md, issue 13).
                     "text_tower": {"kind": "gru", "modality": "text", "word_dim": 64, "hidden": 128}},
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SCENE_ORACLE_PREFIX = "scene-oracle:"
ROLES = ("teacher", "student")
# What a transformers folder or hub id must be for each role (config.json's model_type).
HF_MODEL_TYPES = {"teacher": ("vilt",), "student": tuple(HF_STUDENT_LOADERS)}
# Project folders' "backend" that a student spec may name (every other backend is a teacher's).
STUDENT_BACKEND = "dual_encoder"


class SpecError(ValueError):
    """A --teacher / --student spec that names nothing buildable; the message is one line."""


@dataclass(frozen=True)
class ModelSpec:
    """One parsed spec. form: preset | meter | meter-checkpoint | scene-oracle | from-teacher |
    project-folder | hf-folder | hub. name: the preset (METER's too); path: the folder, checkpoint
    or shard folder; kind: a project folder's backend or a transformers folder's model_type."""
    role: str
    form: str
    text: str
    name: str = ""
    path: str = ""
    kind: str = ""


def looks_like_hub_id(spec):
    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def folder_config(folder, what):
    """A model folder's config.json as a dict, or a one-line SpecError naming the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise SpecError(f"{what} {folder}: a folder without config.json (not a saved model)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise SpecError(f"{what} {folder}: config.json is not valid JSON ({_first_line(error)})") from None
    if not isinstance(config, dict):
        raise SpecError(f"{what} {folder}: config.json is not a JSON object")
    return config


def _meter_spec(spec, what):
    """meter-PRESET, meter-PRESET:PATH.ckpt or a bare PATH.ckpt."""
    from train.models.meter import PRESETS as METER_PRESETS
    if spec.startswith("meter-"):
        preset, _, checkpoint = spec.partition(":")
    else:
        preset, checkpoint = METER_CHECKPOINT_PRESET, spec
    if preset not in METER_PRESETS:
        raise SpecError(f"{what} {spec!r}: unknown METER preset {preset!r} (presets: "
                        f"{', '.join(sorted(METER_PRESETS))})")
    if not checkpoint:
        return ModelSpec("teacher", "meter", spec, name=preset)
    if not Path(checkpoint).is_file():
        raise SpecError(f"{what} {spec!r}: checkpoint {checkpoint} not found")
    return ModelSpec("teacher", "meter-checkpoint", spec, name=preset, path=checkpoint)


def _folder_spec(spec, role, what):
    config = folder_config(spec, what)
    if "backend" in config:
        backend = str(config["backend"])
        if (backend == STUDENT_BACKEND) != (role == "student"):
            other = "student" if backend == STUDENT_BACKEND else f"{backend!r} teacher"
            raise SpecError(f"{what} {spec}: a saved {other} folder, not a {role}")
        if not (Path(spec) / "model.safetensors").is_file():
            raise SpecError(f"{what} {spec}: no model.safetensors beside its config.json")
        return ModelSpec(role, "project-folder", spec, path=spec, kind=backend)
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES[role]:
        wanted = " or ".join(repr(t) for t in HF_MODEL_TYPES[role])
        raise SpecError(f"{what} {spec}: holds neither a saved {role} nor a transformers {wanted} "
                        f"model (model_type {model_type!r})")
    return ModelSpec(role, "hf-folder", spec, path=spec, kind=model_type)


def parse_spec(text, role):
    """The one grammar of --teacher / --student (module docstring); reads a folder's config.json,
    never weights, and never asks a hub (a hub id's model type is the builder's to check)."""
    spec, what = str(text), f"--{role}"
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    presets = TEACHER_PRESETS if role == "teacher" else STUDENT_PRESETS
    if spec in presets:
        return ModelSpec(role, "preset", spec, name=spec)
    if role == "student" and spec == "from-teacher":
        return ModelSpec(role, "from-teacher", spec)
    if role == "teacher" and spec.startswith(SCENE_ORACLE_PREFIX):
        shards = spec[len(SCENE_ORACLE_PREFIX):]
        if not Path(shards).is_dir():
            raise SpecError(f"{what} {spec!r}: {shards!r} is not a folder (scene-oracle:SHARDS names "
                            f"a shard folder)")
        return ModelSpec(role, "scene-oracle", spec, path=shards)
    if role == "teacher" and (spec.startswith("meter-") or spec.endswith(".ckpt")):
        return _meter_spec(spec, what)
    if Path(spec).is_dir():
        return _folder_spec(spec, role, what)
    if Path(spec).exists():
        raise SpecError(f"{what} {spec}: a file, not a model folder or preset")
    if looks_like_hub_id(spec):
        return ModelSpec(role, "hub", spec, path=spec)
    others = "meter-*, PATH.ckpt, scene-oracle:SHARDS" if role == "teacher" else "from-teacher"
    raise SpecError(f"unknown {role} spec {spec!r}: not a preset ({', '.join(presets)}, {others}), "
                    f"an existing folder or a hub id")


def hub_model_type(spec):
    """model_type of a hub id from its config alone (no weights); offline it fails in one line."""
    try:
        from transformers import AutoConfig
        model_type = AutoConfig.from_pretrained(spec.text).model_type
    except Exception as error:  # offline hub, unknown repo, no network: all end the same way
        raise SpecError(f"--{spec.role} {spec.text!r}: not a preset or an existing folder, and as a "
                        f"hub id: {_first_line(error)}") from None
    if model_type not in HF_MODEL_TYPES[spec.role]:
        wanted = " or ".join(repr(t) for t in HF_MODEL_TYPES[spec.role])
        raise SpecError(f"--{spec.role} hub id {spec.text!r} is a {model_type!r} model, not {wanted}")
    return model_type


def _data_tokenizer(tokenizer_dir, what):
    if tokenizer_dir is None:
        raise ValueError(f"{what} needs the data tokenizer (tokenizer_dir) and none was given")
    return load_tokenizer(tokenizer_dir)


def meter_tokenizer_dir(spec, tokenizer_dir, tokenizer):
    """meter-tiny reads with the data tokenizer; the published METER (random or from a checkpoint)
    with RoBERTa's, which only --tokenizer can name (nothing is downloaded)."""
    if tokenizer is not None:
        return tokenizer
    if spec.name == "meter-tiny":
        return tokenizer_dir
    raise SpecError(f"--teacher {spec.text!r}: METER's RoBERTa text tower needs its own tokenizer, "
                    f"not the shards': give --tokenizer FOLDER (a saved roberta-base tokenizer)")


# ----------------------------------------------------------------------------------------------
# teachers

def teacher_from_preset(name, tokenizer_dir=None):
    preset = TEACHER_PRESETS[name]
    tokenizer = _data_tokenizer(tokenizer_dir, f"teacher preset {name}")
    if preset["backend"] == "film":
        return FilmCrossEncoder({k: v for k, v in preset.items() if k != "backend"}, tokenizer)
    vilt_config = dict(preset["vilt_config"])
    vilt_config.setdefault("vocab_size", len(tokenizer))
    vilt_config.setdefault("pad_token_id", tokenizer.pad_token_id)
    return ViltCrossEncoder.from_config(vilt_config, tokenizer, masked_word_head=preset["masked_word_head"])


def _meter_module():
    return importlib.import_module(LAZY_TEACHER_MODULES["meter"])


def _import_lazy_module(table, name):
    """Import the module registering backend or tower kind `name`, when it is a lazy one."""
    module = table.get(name.split("_")[0])
    if module is not None:
        importlib.import_module(module)


def load_teacher_folder(folder):
    """A folder written by CrossEncoder.save_pretrained: the class registered for its "backend"."""
    backend = read_config(folder).get("backend")
    _import_lazy_module(LAZY_TEACHER_MODULES, str(backend))
    if backend not in TEACHER_BACKENDS:
        raise ValueError(f"teacher folder {folder} has unknown backend {backend!r}")
    return TEACHER_BACKENDS[backend].from_pretrained(folder)


def build_teacher(spec, tokenizer_dir=None, tokenizer=None):
    """tokenizer_dir: the data tokenizer (presets from scratch); tokenizer: --tokenizer FOLDER, the
    tokenizer of a pretrained teacher whose folder has none (or that replaces its own)."""
    spec = parse_spec(spec, "teacher")
    if spec.form == "preset":
        return teacher_from_preset(spec.name, tokenizer_dir)
    if spec.form in ("meter", "meter-checkpoint"):
        return _meter_module().build_meter_teacher(spec.text, meter_tokenizer_dir(spec, tokenizer_dir, tokenizer))
    if spec.form == "scene-oracle":  # ground truth of the synthetic scenes (DCD's upper bound)
        from train.models.oracle import build_scene_oracle
        return build_scene_oracle(spec.text)
    if spec.form == "project-folder":
        if spec.kind == "meter":  # its own tokenizer/ wins; older folders fall back on the data one
            return _meter_module().build_meter_teacher(spec.path, tokenizer or tokenizer_dir)
        return load_teacher_folder(spec.path)
    if spec.form == "hub":
        hub_model_type(spec)
    return ViltCrossEncoder.from_transformers(spec.path, tokenizer)


def load_teacher(folder):
    """A teacher folder written by save_pretrained (any backend, or a transformers ViLT folder)."""
    return build_teacher(folder)


# ----------------------------------------------------------------------------------------------
# students

def student_from_teacher(teacher):
    backend = getattr(teacher, "backend", None)
    if backend == "vilt":
        return student_from_vilt_teacher(teacher)
    if backend == "meter":
        return importlib.import_module(LAZY_TOWER_MODULES["meter"]).meter_student_from_teacher(teacher)
    raise ValueError(f"cannot initialise a student from a {backend!r} teacher (it has no unimodal "
                     f"towers): use student-tiny or an HF dual encoder")


def _preset_tokenizer(spec, tokenizer_dir, teacher, tokenizer):
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if tokenizer_dir is None and teacher is not None:
        return teacher.tokenizer
    return _data_tokenizer(tokenizer_dir, f"student preset {spec.name}")


def build_student(spec, tokenizer_dir=None, teacher=None, tokenizer=None):
    """tokenizer_dir: the data tokenizer (presets); tokenizer: --tokenizer FOLDER (see build_teacher)."""
    spec = parse_spec(spec, "student")
    if spec.form == "preset":
        words = _preset_tokenizer(spec, tokenizer_dir, teacher, tokenizer)
        return student_from_config(STUDENT_PRESETS[spec.name], words)
    if spec.form == "from-teacher":
        if teacher is None:
            raise ValueError("student spec 'from-teacher' needs a teacher")
        return student_from_teacher(teacher)
    if spec.form == "project-folder":
        return load_student(spec.path)
    if spec.form == "hub":
        return HF_STUDENT_LOADERS[hub_model_type(spec)](spec.path, tokenizer)
    return load_hf_student(spec.path, tokenizer)


def load_student(folder, tokenizer=None):
    """A student folder written by DualEncoder.save_pretrained: the project's format (towers of lazy
    kinds imported first) or the CLIPModel / VisionTextDualEncoderModel folder it was exported as."""
    config = read_config(folder)
    if "backend" not in config and "model_type" in config:
        return load_hf_student(folder, tokenizer)
    for tower in ("image_tower", "text_tower"):
        _import_lazy_module(LAZY_TOWER_MODULES, config.get(tower, {}).get("kind", ""))
    return DualEncoder.from_pretrained(folder)
