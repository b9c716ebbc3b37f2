"""The dual-encoder student: two towers, linear projections, a learnable temperature.

    img_emb, txt_emb = student(pixel_values, input_ids, attention_mask)   # each [N, D], L2-normalised

Towers are built from small config dicts through a registry of tower kinds, so that
`DualEncoder.from_pretrained(folder)` can rebuild any student from its config.json alone, and other
modules (METER) can register their own kinds (train/models/presets.py's `load_student` imports such
a module before loading a folder that needs it). A tower is an nn.Module with `width` (the size of its
pooled output) and `tower_config` (a JSON-able dict with "kind" and "modality"); an image tower's
forward takes pixel_values, a text tower's takes (input_ids, attention_mask); both return [N, width].

Kinds here: `cnn` (image, CPU), `transformer` and `gru` (text, CPU), `vilt` (ViLT's transformer
run on image-only or text-only sequences); `hf_clip` / `hf_vtde` (a CLIPModel's or a
VisionTextDualEncoderModel's towers) live in train/models/hf_dual.py, which also writes such a
student back out as that model's own folder.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.common import (TOKENIZER_DIR, load_tokenizer, load_weights, read_project_config,
                                 resize_crop_normalize, tokenize_captions, with_coordinates,
                                 write_model_folder)

# ----------------------------------------------------------------------------------------------
# tower registry

TOWER_KINDS = {}
# Tower kind -> writer(student, folder), for students that go out as another library's own folder
# (hf_clip -> CLIPModel, hf_vtde -> VisionTextDualEncoderModel: train/models/hf_dual.py).
FOLDER_WRITERS = {}


def register_tower(*kinds):
    """Class decorator: `@register_tower("cnn")`. The class is built as cls(tower_config)."""
    def register(cls):
        for kind in kinds:
            TOWER_KINDS[kind] = cls
        return cls
    return register


def build_tower(tower_config):
    kind = tower_config["kind"]
    if kind not in TOWER_KINDS:  # kinds of lazily imported modules: presets.load_student imports them
        raise ValueError(f"unknown tower kind {kind!r} (known: {', '.join(sorted(TOWER_KINDS))})")
    return TOWER_KINDS[kind](dict(tower_config))


# ----------------------------------------------------------------------------------------------
# CPU towers

@register_tower("cnn")
class ConvImageTower(nn.Module):
    """Small conv net that keeps the layout: coordinate channels in, an s x s feature map out, then
    either attention pooling over positions with learned position embeddings or flatten-and-project.
    A global average pool alone would throw away which colour sits where (the binding)."""

    def __init__(self, cfg):
        super().__init__()
        cfg = dict(dict(channels=[16, 32, 64, 64], strides=[2, 2, 2, 1], pool="flatten",
                        flatten_channels=16, width=256, image_size=64, modality="image"), **cfg)
        self.tower_config = cfg
        layers, in_channels = [], 5
        for out_channels, stride in zip(cfg["channels"], cfg["strides"]):
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)
        side = cfg["image_size"] // math.prod(cfg["strides"])
        if cfg["pool"] == "flatten":
            self.squeeze = nn.Conv2d(in_channels, cfg["flatten_channels"], 1)
            self.project = nn.Sequential(
                nn.Linear(cfg["flatten_channels"] * side * side, cfg["width"]), nn.ReLU(inplace=True),
                nn.Linear(cfg["width"], cfg["width"]))
        elif cfg["pool"] == "attention":
            self.position = nn.Parameter(torch.randn(1, side * side, in_channels) * 0.02)
            self.attend = nn.MultiheadAttention(in_channels, num_heads=4, batch_first=True)
            self.query = nn.Parameter(torch.randn(1, 1, in_channels) * 0.02)
            self.project = nn.Linear(in_channels, cfg["width"])
        else:
            raise ValueError(f"cnn tower pool must be 'flatten' or 'attention', not {cfg['pool']!r}")
        self.width = cfg["width"]

    def forward(self, pixel_values):
        features = self.convs(with_coordinates(pixel_values))
        if self.tower_config["pool"] == "flatten":
            return self.project(self.squeeze(features).flatten(1))
        tokens = features.flatten(2).transpose(1, 2) + self.position
        queries = self.query.expand(pixel_values.shape[0], -1, -1)
        pooled, _ = self.attend(queries, tokens, tokens, need_weights=False)
        return self.project(pooled[:, 0])


def masked_mean(states, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@register_tower("transformer")
class TransformerTextTower(nn.Module):
    """Pre-norm transformer encoder over word + position embeddings, masked mean pool."""

    def __init__(self, cfg):
        super().__init__()
        cfg = dict(dict(width=128, layers=2, heads=4, ff=512, max_length=48, dropout=0.0,
                        modality="text"), **cfg)
        self.tower_config = cfg
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["width"])
        self.position = nn.Embedding(cfg["max_length"], cfg["width"])
        layer = nn.TransformerEncoderLayer(cfg["width"], cfg["heads"], cfg["ff"], cfg["dropout"],
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg["width"])
        self.width = cfg["width"]

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)[None]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return masked_mean(self.norm(x), attention_mask)


@register_tower("gru")
class GruTextTower(nn.Module):
    """Bidirectional GRU, final states of both directions (packed: padding does not matter)."""

    def __init__(self, cfg):
        super().__init__()
        cfg = dict(dict(word_dim=64, hidden=128, modality="text"), **cfg)
        self.tower_config = cfg
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["word_dim"])
        self.gru = nn.GRU(cfg["word_dim"], cfg["hidden"], batch_first=True, bidirectional=True)
        self.width = 2 * cfg["hidden"]

    def forward(self, input_ids, attention_mask):
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, final = self.gru(packed)
        return torch.cat([final[0], final[1]], dim=-1)


# ----------------------------------------------------------------------------------------------
# the ViLT tower (the hf_clip / hf_vtde towers: train/models/hf_dual.py)

@register_tower("vilt")
class ViltUnimodalTower(nn.Module):
    """ViLT's single-stream transformer run on one modality: [image CLS + patches] or [text tokens],
    each with ViLT's own embeddings and modality-type embedding; pooled by ViLT's pooler on the first
    token. Initialised from a ViLT teacher, both towers start from what the teacher learned."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import ViltConfig, ViltModel
        self.tower_config = dict(cfg)
        vilt = ViltModel(ViltConfig.from_dict(dict(cfg["hf_config"])), add_pooling_layer=True)
        self.is_image = cfg["modality"] == "image"
        self._take_parts(vilt)
        self.width = vilt.config.hidden_size

    def _take_parts(self, vilt):
        # only the parts this modality uses, so no parameter sits without a gradient
        if self.is_image:
            self.embeddings = vilt.embeddings
        else:
            self.text_embeddings = vilt.embeddings.text_embeddings
            self.token_type_embeddings = vilt.embeddings.token_type_embeddings
        self.encoder, self.layernorm, self.pooler = vilt.encoder, vilt.layernorm, vilt.pooler

    def load_from_vilt(self, vilt):
        """Copy weights from a transformers ViltModel (the teacher's `.vilt`)."""
        source = {"encoder": vilt.encoder, "layernorm": vilt.layernorm, "pooler": vilt.pooler}
        if self.is_image:
            source["embeddings"] = vilt.embeddings
        else:
            source["text_embeddings"] = vilt.embeddings.text_embeddings
            source["token_type_embeddings"] = vilt.embeddings.token_type_embeddings
        for name, module in source.items():
            getattr(self, name).load_state_dict(module.state_dict())

    def forward(self, *inputs):
        if self.is_image:
            hidden, additive_mask = self._image_sequence(inputs[0]), None
        else:
            hidden, additive_mask = self._text_sequence(*inputs)
        hidden = self.encoder(hidden, attention_mask=additive_mask).last_hidden_state
        return self.pooler(self.layernorm(hidden))

    def _image_sequence(self, pixel_values):
        # ViltEmbeddings.forward builds image tokens (CLS, patches, interpolated positions, type 1)
        # only next to text: give it a one-token placeholder text and drop that token again
        n = pixel_values.shape[0]
        placeholder = torch.zeros(n, 1, dtype=torch.long, device=pixel_values.device)
        pixel_mask = torch.ones(n, *pixel_values.shape[-2:], dtype=torch.long, device=pixel_values.device)
        embeddings, _ = self.embeddings(placeholder, torch.ones_like(placeholder), None, pixel_values,
                                        pixel_mask, None, None, image_token_type_idx=1)
        return embeddings[:, 1:]

    def _text_sequence(self, input_ids, attention_mask):
        hidden = self.text_embeddings(input_ids=input_ids)
        hidden = hidden + self.token_type_embeddings(torch.zeros_like(input_ids))
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return hidden, additive_mask


# ----------------------------------------------------------------------------------------------
# the dual encoder

STUDENT_DEFAULTS = dict(backend="dual_encoder", embed_dim=128, projection_bias=True, image_size=64,
                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], max_length=48,
                        init_temperature=0.07, max_logit_scale=100.0)


class Temperature(nn.Module):
    """Holds log(1/T). A submodule (not a bare parameter) so that ZeRO-3 gathers it via its forward."""

    def __init__(self, init_temperature, max_scale):
        super().__init__()
        # Shape [1], not a 0-dim scalar: DeepSpeed 0.19's initial parameter broadcast views every
        # parameter as bytes, which fails for 0-dim tensors ("self.dim() cannot be 0").
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        self.max_log_scale = math.log(max_scale)

    def forward(self):
        return self.logit_scale.clamp(max=self.max_log_scale).exp().squeeze(0)


class DualEncoder(nn.Module):
    def __init__(self, config, tokenizer, image_tower=None, text_tower=None):
        """config: STUDENT_DEFAULTS overrides plus "image_tower" / "text_tower" tower configs.
        Externally built towers (e.g. METER's) may be passed in; their tower_config is what gets saved."""
        super().__init__()
        cfg = dict(STUDENT_DEFAULTS, **config)
        self.image_tower = image_tower if image_tower is not None else build_tower(cfg["image_tower"])
        self.text_tower = text_tower if text_tower is not None else build_tower(cfg["text_tower"])
        cfg["image_tower"] = dict(self.image_tower.tower_config)
        cfg["text_tower"] = dict(self.text_tower.tower_config)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_proj = nn.Linear(self.image_tower.width, cfg["embed_dim"], bias=cfg["projection_bias"])
        self.text_proj = nn.Linear(self.text_tower.width, cfg["embed_dim"], bias=cfg["projection_bias"])
        self.temperature = Temperature(cfg["init_temperature"], cfg["max_logit_scale"])

    @property
    def logit_scale(self):
        return self.temperature.logit_scale

    def temperature_scale(self):
        """exp(logit_scale) clamped to max_logit_scale (100): multiply cosine similarities by it."""
        return self.temperature()

    @property
    def image_size(self):
        return self.cfg["image_size"]

    @property
    def max_length(self):
        return self.cfg["max_length"]

    # -- inputs
    def preprocess_images(self, pixels):
        """uint8 [N,3,H,W] of any aspect: shorter side to image_size, centre crop (as the training
        loader crops, and CLIPImageProcessor), mean/std."""
        return resize_crop_normalize(pixels, self.cfg["image_size"], self.cfg["image_mean"],
                                     self.cfg["image_std"])

    def tokenize(self, captions):
        return tokenize_captions(self.tokenizer, captions, self.cfg["max_length"])

    # -- compute
    def encode_image(self, pixel_values):
        return F.normalize(self.image_proj(self.image_tower(pixel_values)), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        return F.normalize(self.text_proj(self.text_tower(input_ids, attention_mask)), dim=-1)

    def forward(self, pixel_values, input_ids, attention_mask, return_scale=False):
        """(image_emb, text_emb); with return_scale=True also the clamped exp(logit_scale), so a
        trainer can take all three from one engine call (under ZeRO-3 that gathers them together)."""
        embeddings = (self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))
        return (*embeddings, self.temperature_scale()) if return_scale else embeddings

    # -- persistence: loadable with nothing from the trainer
    def save_pretrained(self, folder):
        """The project's folder, or, for a student whose towers came from a transformers model,
        that model's own folder (the writer its tower kind registered in FOLDER_WRITERS)."""
        kinds = {self.cfg["image_tower"]["kind"], self.cfg["text_tower"]["kind"]}
        writer = FOLDER_WRITERS.get(kinds.pop()) if len(kinds) == 1 else None
        if writer is not None:
            return writer(self, folder)
        write_model_folder(self, folder, self.cfg, self.tokenizer)

    @classmethod
    def from_pretrained(cls, folder):
        """A folder in the project's student format (train.models.presets.load_student also reads
        the transformers folders a CLIP / VisionTextDualEncoder student is exported as)."""
        folder = Path(folder)
        model = cls(read_project_config(folder, STUDENT_DEFAULTS["backend"]),
                    load_tokenizer(folder / TOKENIZER_DIR))
        return load_weights(model, folder)


# ----------------------------------------------------------------------------------------------
# initialisations

def student_from_config(config, tokenizer):
    """Random init from a preset config; text towers learn their vocabulary size from the tokenizer."""
    config = json.loads(json.dumps(config))  # private copy
    config["text_tower"].setdefault("vocab_size", len(tokenizer))
    config["text_tower"].setdefault("max_length", config.get("max_length", STUDENT_DEFAULTS["max_length"]))
    config["image_tower"].setdefault("image_size", config.get("image_size", STUDENT_DEFAULTS["image_size"]))
    return DualEncoder(config, tokenizer)


def student_from_vilt_teacher(teacher, embed_dim=256):
    """Both towers start as the teacher's ViLT transformer (docs/method.md, step 8); the inputs are
    prepared exactly as the teacher prepares them (same tokenizer, image size, normalisation)."""
    vilt = teacher.model.vilt
    towers = []
    for modality in ("image", "text"):
        tower = build_tower({"kind": "vilt", "modality": modality, "hf_config": vilt.config.to_dict()})
        tower.load_from_vilt(vilt)
        towers.append(tower)
    config = dict(embed_dim=embed_dim, image_size=teacher.image_size, image_mean=teacher.image_mean,
                  image_std=teacher.image_std, max_length=teacher.max_length)
    return DualEncoder(config, teacher.tokenizer, *towers)
