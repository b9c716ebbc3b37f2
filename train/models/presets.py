"""Model specs -> models, in one place.

A spec is a preset name, a folder saved by this project (config.json with "backend"), a folder saved
by transformers (ViLT teacher; CLIP / VisionTextDualEncoder student), or a hub id (org/name, tried
only when it is not a local path; offline it fails with one line). Anything else: ValueError.
Weights are read only with safetensors (ours) or transformers' own loaders (safetensors first).
"""
import importlib
import re
from pathlib import Path

from train.models.student import (DualEncoder, student_from_config, student_from_hf_clip,
                                  student_from_hf_vtde, student_from_vilt_teacher)
from train.models.common import load_tokenizer, read_config
from train.models.film import FILM_DEFAULTS, FilmCrossEncoder
from train.models.teacher import TEACHER_BACKENDS
from train.models.vilt import ViltCrossEncoder

# Backends and tower kinds whose modules are imported only when a spec or folder needs them (METER
# pulls in more of transformers), by the name of the backend / the prefix of the tower kind. The
# modules register their classes (register_teacher, register_tower) when imported.
LAZY_TEACHER_MODULES = {"meter": "train.models.meter"}
LAZY_TOWER_MODULES = {"meter": "train.models.meter_student"}

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


def _looks_like_hub_id(spec):
    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _data_tokenizer(tokenizer_dir, what):
    if tokenizer_dir is None:
        raise ValueError(f"{what} needs the data tokenizer (tokenizer_dir) and none was given")
    return load_tokenizer(tokenizer_dir)


def _transformers_model_type(spec):
    """model_type of a transformers folder or hub id (config.json), or None."""
    path = Path(spec)
    if path.is_dir():
        return read_config(path).get("model_type")
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(spec).model_type


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


def build_teacher(spec, tokenizer_dir=None):
    spec = str(spec)
    if spec in TEACHER_PRESETS:
        return teacher_from_preset(spec, tokenizer_dir)
    if spec.startswith("meter-"):
        return _meter_module().build_meter_teacher(spec, tokenizer_dir)
    if spec.startswith("scene-oracle:"):  # ground truth of the synthetic scenes (DCD's upper bound)
        from train.models.oracle import build_scene_oracle
        return build_scene_oracle(spec)
    path = Path(spec)
    if path.is_dir():
        config = read_config(path)
        if config.get("backend") == "meter":
            return _meter_module().build_meter_teacher(spec, tokenizer_dir)
        if "backend" in config:
            return load_teacher_folder(path)
        if config.get("model_type") == "vilt":
            return ViltCrossEncoder.from_transformers(path, tokenizer_dir)
        raise ValueError(f"teacher folder {spec} holds neither a saved teacher nor a ViLT model "
                         f"(model_type {config.get('model_type')!r})")
    if _looks_like_hub_id(spec):
        try:
            model_type = _transformers_model_type(spec)
        except Exception as error:  # offline hub, unknown repo, no network: all end the same way
            raise ValueError(f"teacher spec {spec!r}: not a preset or folder, and as a hub id: "
                             f"{_first_line(error)}") from None
        if model_type != "vilt":
            raise ValueError(f"teacher hub id {spec!r} is a {model_type!r} model, not ViLT")
        return ViltCrossEncoder.from_transformers(spec, tokenizer_dir)
    raise ValueError(f"unknown teacher spec {spec!r}: not a preset ({', '.join(TEACHER_PRESETS)}, "
                     f"meter-*, scene-oracle:SHARDS), an existing folder or a hub id")


def load_teacher(folder):
    """A teacher folder written by save_pretrained (any backend)."""
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


def _student_from_transformers(spec, model_type, tokenizer_dir):
    if model_type == "clip":
        return student_from_hf_clip(spec, tokenizer_dir)
    if model_type == "vision-text-dual-encoder":
        return student_from_hf_vtde(spec, tokenizer_dir)
    raise ValueError(f"student spec {spec!r} is a {model_type!r} model, not CLIP or VisionTextDualEncoder")


def build_student(spec, tokenizer_dir=None, teacher=None):
    spec = str(spec)
    if spec in STUDENT_PRESETS:
        if tokenizer_dir is None and teacher is not None:
            tokenizer = teacher.tokenizer
        else:
            tokenizer = _data_tokenizer(tokenizer_dir, f"student preset {spec}")
        return student_from_config(STUDENT_PRESETS[spec], tokenizer)
    if spec == "from-teacher":
        if teacher is None:
            raise ValueError("student spec 'from-teacher' needs a teacher")
        return student_from_teacher(teacher)
    path = Path(spec)
    if path.is_dir():
        config = read_config(path)
        if config.get("backend") == "dual_encoder":
            return load_student(path)
        if "model_type" in config:
            return _student_from_transformers(spec, config["model_type"], tokenizer_dir)
        raise ValueError(f"student folder {spec} holds neither a saved student nor a CLIP / "
                         f"VisionTextDualEncoder model")
    if _looks_like_hub_id(spec):
        try:
            model_type = _transformers_model_type(spec)
        except Exception as error:
            raise ValueError(f"student spec {spec!r}: not a preset or folder, and as a hub id: "
                             f"{_first_line(error)}") from None
        return _student_from_transformers(spec, model_type, tokenizer_dir)
    raise ValueError(f"unknown student spec {spec!r}: not a preset ({', '.join(STUDENT_PRESETS)}, "
                     f"from-teacher), an existing folder or a hub id")


def load_student(folder):
    """A student folder written by DualEncoder.save_pretrained (towers of lazy kinds imported first)."""
    config = read_config(folder)
    for tower in ("image_tower", "text_tower"):
        _import_lazy_module(LAZY_TOWER_MODULES, config.get(tower, {}).get("kind", ""))
    return DualEncoder.from_pretrained(folder)
