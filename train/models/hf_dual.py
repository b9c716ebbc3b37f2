"""Students made of a transformers dual encoder, in and out: a CLIPModel (tower kind `hf_clip`) or a
VisionTextDualEncoderModel (`hf_vtde`) becomes a DualEncoder whose towers are that model's vision
and text models and whose projections and temperature are its own; exported, such a student goes
back out as that model's own folder (model + CLIPImageProcessor settings + tokenizer), which
`CLIPModel.from_pretrained` / `VisionTextDualEncoderModel.from_pretrained` load with nothing from
this project. train/models/presets.py imports this module for those specs and folders.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

from train.models.common import (CLIP_MEAN, CLIP_STD, read_config, require_tokenizer,
                                 write_processor_config)
from train.models.student import FOLDER_WRITERS, DualEncoder, build_tower, register_tower

VTDE_MEAN = [0.5, 0.5, 0.5]
VTDE_STD = [0.5, 0.5, 0.5]
# What DualEncoder.preprocess_images does, written as CLIPImageProcessor's settings (bicubic resize of
# the shorter side, centre crop, rescale, normalise): an exported student's processor crops as it does.
CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "resample": 3,
                  "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "do_convert_rgb": True}


@register_tower("hf_clip", "hf_vtde")
class HfPooledTower(nn.Module):
    """A transformers vision or text model (built from its config dict with AutoModel) whose
    pooler_output is the tower's feature; the model's projection becomes the student's projection.
    CLIPModel and VisionTextDualEncoderModel both hold exactly such models as vision_model/text_model."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        self.tower_config = dict(cfg)
        hf_config = dict(cfg["hf_config"])
        self.model = AutoModel.from_config(AutoConfig.for_model(hf_config.pop("model_type"), **hf_config))
        self.width = self.model.config.hidden_size
        self.is_image = cfg["modality"] == "image"

    def forward(self, *inputs):
        if self.is_image:
            return self.model(pixel_values=inputs[0]).pooler_output
        input_ids, attention_mask = inputs
        return self.model(input_ids=input_ids, attention_mask=attention_mask).pooler_output


# ----------------------------------------------------------------------------------------------
# in

def image_processor_settings(folder, default_size, default_mean, default_std):
    """Size and mean/std from a preprocessor_config.json (crop size wins: it is what the model sees)."""
    size, mean, std = default_size, default_mean, default_std
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        processor = json.loads(path.read_text())
        declared = processor.get("crop_size") or processor.get("size") or size
        if isinstance(declared, dict):
            declared = declared.get("shortest_edge") or declared.get("height") or size
        size = declared
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
    return int(size), list(mean), list(std)


def _student_from_hf_dual(hf_model, name_or_folder, tokenizer, kind, default_mean, default_std):
    """Shared by CLIP and VisionTextDualEncoder: towers, projections and temperature copied over."""
    vision_model, text_model = hf_model.vision_model, hf_model.text_model
    image_tower = build_tower({"kind": kind, "modality": "image", "hf_config": vision_model.config.to_dict()})
    text_tower = build_tower({"kind": kind, "modality": "text", "hf_config": text_model.config.to_dict()})
    image_tower.model.load_state_dict(vision_model.state_dict())
    text_tower.model.load_state_dict(text_model.state_dict())
    local = Path(name_or_folder).is_dir()
    size, mean, std = image_processor_settings(name_or_folder if local else None,
                                               vision_model.config.image_size, default_mean, default_std)
    config = dict(embed_dim=hf_model.config.projection_dim, projection_bias=False, image_size=size,
                  image_mean=mean, image_std=std,
                  max_length=getattr(text_model.config, "max_position_embeddings", 77))
    student = DualEncoder(config, tokenizer, image_tower, text_tower)
    student.image_proj.load_state_dict(hf_model.visual_projection.state_dict())
    student.text_proj.load_state_dict(hf_model.text_projection.state_dict())
    with torch.no_grad():
        student.logit_scale.copy_(hf_model.logit_scale.detach().reshape(1))
    return student


def student_from_hf_clip(name_or_folder, tokenizer=None):
    """A CLIPModel folder or hub id; `tokenizer`: a folder that replaces the model's own (--tokenizer)."""
    from transformers import CLIPModel
    clip = CLIPModel.from_pretrained(str(name_or_folder))
    words = require_tokenizer(name_or_folder, tokenizer, "CLIP student")
    return _student_from_hf_dual(clip, name_or_folder, words, "hf_clip", CLIP_MEAN, CLIP_STD)


def student_from_hf_vtde(name_or_folder, tokenizer=None):
    from transformers import VisionTextDualEncoderModel
    vtde = VisionTextDualEncoderModel.from_pretrained(str(name_or_folder))
    words = require_tokenizer(name_or_folder, tokenizer, "VisionTextDualEncoder student")
    return _student_from_hf_dual(vtde, name_or_folder, words, "hf_vtde", VTDE_MEAN, VTDE_STD)


HF_STUDENT_LOADERS = {"clip": student_from_hf_clip, "vision-text-dual-encoder": student_from_hf_vtde}


def load_hf_student(folder, tokenizer=None):
    """A CLIPModel / VisionTextDualEncoderModel folder (what such a student is exported as)."""
    model_type = read_config(folder).get("model_type")
    if model_type not in HF_STUDENT_LOADERS:
        raise ValueError(f"student folder {folder} is a {model_type!r} model, not CLIP or "
                         f"VisionTextDualEncoder")
    return HF_STUDENT_LOADERS[model_type](folder, tokenizer)


# ----------------------------------------------------------------------------------------------
# out

def _empty_hf_dual(student, kind):
    """A CLIPModel / VisionTextDualEncoderModel of the student's sizes (weights copied next)."""
    vision_config = student.image_tower.model.config
    text_config = student.text_tower.model.config
    embed_dim = student.cfg["embed_dim"]
    if kind == "hf_clip":
        from transformers import CLIPConfig, CLIPModel
        return CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                    projection_dim=embed_dim))
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_config, text_config,
                                                                  projection_dim=embed_dim)
    return VisionTextDualEncoderModel(config=config)


def hf_dual_model(student):
    """The student as the transformers model its towers came from, with its exact weights."""
    kind = student.cfg["image_tower"]["kind"]
    model = _empty_hf_dual(student, kind)
    model.vision_model.load_state_dict(student.image_tower.model.state_dict())
    model.text_model.load_state_dict(student.text_tower.model.state_dict())
    model.visual_projection.load_state_dict(student.image_proj.state_dict())
    model.text_projection.load_state_dict(student.text_proj.state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(student.logit_scale.detach().reshape(model.logit_scale.shape))
    return model.eval()


def write_hf_dual_folder(student, folder):
    """model + preprocessor_config.json (the student's own preprocessing) + tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_dual_model(student).save_pretrained(str(folder))
    size = student.cfg["image_size"]
    write_processor_config(folder, dict(CLIP_PROCESSOR, size={"shortest_edge": size},
                                        crop_size={"height": size, "width": size},
                                        image_mean=list(student.cfg["image_mean"]),
                                        image_std=list(student.cfg["image_std"])))
    student.tokenizer.save_pretrained(str(folder))


FOLDER_WRITERS.update(hf_clip=write_hf_dual_folder, hf_vtde=write_hf_dual_folder)
