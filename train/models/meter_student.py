"""The METER student: the teacher's unimodal towers without the fusion layers, so a gallery is
embedded once. Registers the tower kinds `meter_image` and `meter_text` (presets.load_student imports
this module for kinds starting with "meter").
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from train.models.meter import MeterConfig, MeterImageTower, MeterTeacher, MeterTextTower
from train.models.student import DualEncoder, build_tower, register_tower

@register_tower("meter_image")
class MeterImageFeatures(nn.Module):
    """Student image tower: METER's CLIP ViT, pooled on the class token (after CLIP's final LayerNorm,
    the token METER's fusion starts from)."""

    def __init__(self, tower_config: dict):
        super().__init__()
        self.tower_config = dict(tower_config)
        self.tower = MeterImageTower(MeterConfig.from_dict(tower_config["meter"]))
        self.width = self.tower.width

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values)[:, 0]


@register_tower("meter_text")
class MeterTextFeatures(nn.Module):
    """Student text tower: METER's RoBERTa/BERT, pooled on the first token (<s> / [CLS]); METER never
    trains RoBERTa's pooler, so the raw first-token state is used."""

    def __init__(self, tower_config: dict):
        super().__init__()
        self.tower_config = dict(tower_config)
        self.tower = MeterTextTower(MeterConfig.from_dict(tower_config["meter"]))
        self.width = self.tower.width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower(input_ids, attention_mask)[:, 0]


def meter_student_from_teacher(teacher: MeterTeacher, embed_dim: int = 256) -> DualEncoder:
    """DualEncoder whose towers are copies of the teacher's image and text towers (the fusion layers
    and heads stay behind) with new projection heads; inputs are prepared at the teacher's image size
    and normalisation, with its tokenizer and maximum length."""
    config = asdict(teacher.meter_config)
    image_tower = build_tower({"kind": "meter_image", "modality": "image", "meter": config})
    text_tower = build_tower({"kind": "meter_text", "modality": "text", "meter": config})
    image_tower.tower.load_state_dict(teacher.image_tower.state_dict())
    text_tower.tower.load_state_dict(teacher.text_tower.state_dict())
    student_config = dict(embed_dim=embed_dim, image_size=teacher.image_size,
                          image_mean=list(teacher.image_mean), image_std=list(teacher.image_std),
                          max_length=teacher.max_length)
    return DualEncoder(student_config, teacher.tokenizer, image_tower, text_tower)
