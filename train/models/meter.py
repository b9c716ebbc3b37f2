"""METER co-attention cross-encoder teacher (backend "meter").

METER (Dou et al. 2022, "An Empirical Study of Training End-to-End Vision-and-Language Transformers")
encodes the image and the caption separately (a CLIP ViT and a RoBERTa), projects both to the fusion
width, adds a modality (token-type) embedding, then runs N co-attention layers: at every layer each side
does self-attention, cross-attention to the other side's previous-layer states, and a feed-forward
block (post-LayerNorm, BERT style). The first token of each side is pooled (dense + tanh), and the
retrieval score is one linear logit on [text_pooled, image_pooled].

Because the two towers are unimodal, a batch of pairs built from I unique images and T unique captions
encodes each image and each caption once; only the fusion layers run per pair.

This module is imported lazily by `train/models/presets.py` (specs `meter-*`, folders whose config.json
has backend "meter"). Public entry points:
    build_meter_teacher(spec_or_folder, tokenizer_dir=None) -> MeterTeacher
        spec: meter-tiny | meter-clip16-roberta | PRESET:PATH.ckpt | PATH.ckpt | a saved folder
    meter_config_from_state_dict(mapped, base=None) -> MeterConfig (sizes read from the weights)
The official checkpoint's key mapping is in meter_checkpoint.py; the student built from this
teacher's towers (`meter_student_from_teacher`) in meter_student.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, RobertaConfig,
                          RobertaModel)

from train.models.common import CLIP_MEAN, CLIP_STD, load_tokenizer
from train.models.meter_checkpoint import IMAGE_PREFIX, load_meter_checkpoint
from train.models.teacher import CrossEncoder, register_teacher

BACKEND_NAME = "meter"

# Token types METER gives each side before fusion: text 0, image 1 (`image_token_type_idx=1`).
TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1


@dataclass
class MeterConfig:
    """Every size that shapes a METER model; saved as config.json beside the weights."""
    # Image tower: a CLIP ViT. `vision_layers` counts the blocks this model runs; METER builds OpenAI
    # CLIP with one block fewer than the released CLIP (ViT-B/16 has 12, METER runs 11).
    image_size: int = 64
    patch_size: int = 16
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 256
    vision_layer_norm_eps: float = 1e-5
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    # Text tower: RoBERTa (METER's published choice) or BERT.
    text_kind: str = "roberta"
    vocab_size: int = 1000
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 256
    text_layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    type_vocab_size: int = 1
    max_position_embeddings: int = 514
    max_text_len: int = 40
    text_dropout: float = 0.1
    # Co-attention fusion (METER's `num_top_layer` BertCrossLayers per side).
    hidden_size: int = 64
    fusion_layers: int = 2
    fusion_heads: int = 2
    fusion_intermediate: int = 256
    # METER builds its fusion layers from a default BertConfig/RobertaConfig: eps 1e-12, dropout 0.1.
    fusion_layer_norm_eps: float = 1e-12
    fusion_dropout: float = 0.1

    @classmethod
    def from_dict(cls, values: dict) -> "MeterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown METER config fields: {unknown}")
        values = dict(values)
        for name in ("image_mean", "image_std"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


def meter_tiny_config(vocab_size: int, pad_token_id: int, max_text_len: int = 40) -> MeterConfig:
    """CPU preset: a 2-layer 64-wide CLIP ViT at 64 px, a 2-layer RoBERTa over the data tokenizer's
    vocabulary, and 2 co-attention layers. For tests and pipeline checks, not for accuracy."""
    return MeterConfig(
        image_size=64, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
        vision_intermediate=256,
        text_kind="roberta", vocab_size=vocab_size, text_width=64, text_layers=2, text_heads=2,
        text_intermediate=256, pad_token_id=pad_token_id, type_vocab_size=1,
        # RoBERTa numbers positions from pad_token_id + 1, so the table needs that many extra rows.
        max_position_embeddings=max_text_len + pad_token_id + 1, max_text_len=max_text_len,
        hidden_size=64, fusion_layers=2, fusion_heads=2, fusion_intermediate=256)


def meter_clip16_roberta_config() -> MeterConfig:
    """The published METER-CLIP16-RoBERTa: CLIP ViT-B/16 at 288 px (11 of its 12 blocks, as METER runs
    them), roberta-base (vocabulary 50265, 514 positions, pad id 1), 6 co-attention layers of width 768
    with 12 heads, text truncated to 40 tokens (meter/config.py)."""
    return MeterConfig(
        image_size=288, patch_size=16, vision_width=768, vision_layers=11, vision_heads=12,
        vision_intermediate=3072,
        text_kind="roberta", vocab_size=50265, text_width=768, text_layers=12, text_heads=12,
        text_intermediate=3072, text_layer_norm_eps=1e-5, pad_token_id=1, type_vocab_size=1,
        max_position_embeddings=514, max_text_len=40,
        hidden_size=768, fusion_layers=6, fusion_heads=12, fusion_intermediate=3072)


PRESETS = {"meter-tiny", "meter-clip16-roberta"}


# ----------------------------------------------------------------------------------------------------
# Unimodal towers (shared with the student built from a METER teacher)

class MeterImageTower(nn.Module):
    """CLIP ViT through Hugging Face `CLIPVisionModel`; returns every token after the final LayerNorm
    (METER applies CLIP's `ln_post` to all tokens, where HF applies it to the class token only)."""

    def __init__(self, config: MeterConfig):
        super().__init__()
        self.clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=config.vision_width, intermediate_size=config.vision_intermediate,
            num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
            image_size=config.image_size, patch_size=config.patch_size, hidden_act="quick_gelu",
            layer_norm_eps=config.vision_layer_norm_eps))
        self.width = config.vision_width

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.clip(pixel_values=pixel_values).last_hidden_state
        return self.clip.post_layernorm(hidden)


class MeterTextTower(nn.Module):
    """RoBERTa (or BERT) encoder without its pooler: METER runs the embeddings and the layers only."""

    def __init__(self, config: MeterConfig):
        super().__init__()
        config_class, model_class = {"roberta": (RobertaConfig, RobertaModel),
                                     "bert": (BertConfig, BertModel)}[config.text_kind]
        self.encoder = model_class(config_class(
            vocab_size=config.vocab_size, hidden_size=config.text_width,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            intermediate_size=config.text_intermediate, layer_norm_eps=config.text_layer_norm_eps,
            pad_token_id=config.pad_token_id, type_vocab_size=config.type_vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            hidden_dropout_prob=config.text_dropout, attention_probs_dropout_prob=config.text_dropout),
            add_pooling_layer=False)
        self.width = config.text_width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# ----------------------------------------------------------------------------------------------------
# Co-attention fusion

class BertStyleAttention(nn.Module):
    """Multi-head attention with a post-LayerNorm residual. Queries come from `hidden`; keys and values
    from `context` (the same tensor for self-attention, the other modality for cross-attention)."""

    def __init__(self, width: int, heads: int, dropout: float, eps: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not a multiple of {heads} heads")
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.output = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, hidden, context, context_keep=None):
        """context_keep: bool [N, Lc], True where a context token may be attended to (None: all)."""
        mask = None if context_keep is None else context_keep[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            self._split_heads(self.query(hidden)), self._split_heads(self.key(context)),
            self._split_heads(self.value(context)), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(hidden.shape)
        return self.norm(hidden + F.dropout(self.output(attended), self.dropout, self.training))


class CoAttentionLayer(nn.Module):
    """One side of a METER fusion layer (METER's BertCrossLayer): self-attention over its own tokens,
    cross-attention to the other side, then a GELU feed-forward, each with a post-LN residual."""

    def __init__(self, config: MeterConfig):
        super().__init__()
        width, heads = config.hidden_size, config.fusion_heads
        dropout, eps = config.fusion_dropout, config.fusion_layer_norm_eps
        self.self_attention = BertStyleAttention(width, heads, dropout, eps)
        self.cross_attention = BertStyleAttention(width, heads, dropout, eps)
        self.ffn_in = nn.Linear(width, config.fusion_intermediate)
        self.ffn_out = nn.Linear(config.fusion_intermediate, width)
        self.ffn_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, own, other, own_keep=None, other_keep=None):
        own = self.self_attention(own, own, own_keep)
        own = self.cross_attention(own, other, other_keep)
        expanded = F.gelu(self.ffn_in(own))  # erf GELU, as BERT's "gelu"
        return self.ffn_norm(own + F.dropout(self.ffn_out(expanded), self.dropout, self.training))


class FirstTokenPooler(nn.Module):
    """dense + tanh on the first token (METER's heads.Pooler)."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(tokens[:, 0]))


def _init_fusion_weights(module: nn.Module) -> None:
    """METER's objectives.init_weights for the parts it trains from scratch: N(0, 0.02), zero bias."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------
# The teacher

@register_teacher
class MeterTeacher(CrossEncoder):
    """METER cross-encoder behind the project's CrossEncoder interface: forward(pixel_values,
    input_ids, attention_mask, image_index=None, text_index=None) -> matching logits [N] for the pairs
    (image_index[n], text_index[n]); each unique image and caption goes through its tower once."""

    backend = BACKEND_NAME

    def __init__(self, config: MeterConfig, tokenizer=None):
        super().__init__(tokenizer, config.max_text_len, config.image_size, config.image_mean,
                         config.image_std)
        # Not `config`: trainers and DeepSpeed helpers read `model.config` as a Hugging Face config.
        self.meter_config = config
        self.image_tower = MeterImageTower(config)
        self.text_tower = MeterTextTower(config)
        self.image_to_fusion = nn.Linear(config.vision_width, config.hidden_size)
        self.text_to_fusion = nn.Linear(config.text_width, config.hidden_size)
        self.modality_embeddings = nn.Embedding(2, config.hidden_size)
        self.text_fusion_layers = nn.ModuleList(
            CoAttentionLayer(config) for _ in range(config.fusion_layers))
        self.image_fusion_layers = nn.ModuleList(
            CoAttentionLayer(config) for _ in range(config.fusion_layers))
        self.text_pooler = FirstTokenPooler(config.hidden_size)
        self.image_pooler = FirstTokenPooler(config.hidden_size)
        # METER's pre-training ITM head (2 classes on [text_pooled, image_pooled]). For retrieval METER
        # adds a 1-logit `rank_output` initialised from the ITM head's "match" row and freezes the ITM
        # head; we do the same, so a pre-training or a retrieval checkpoint both load.
        self.itm_head = nn.Linear(2 * config.hidden_size, 2)
        self.rank_head = nn.Linear(2 * config.hidden_size, 1)
        for part in (self.image_to_fusion, self.text_to_fusion, self.modality_embeddings,
                     self.text_fusion_layers, self.image_fusion_layers, self.text_pooler,
                     self.image_pooler, self.itm_head):
            part.apply(_init_fusion_weights)
        self.reset_rank_head_from_itm()
        self.itm_head.requires_grad_(False)

    @torch.no_grad()
    def reset_rank_head_from_itm(self) -> None:
        self.rank_head.weight.copy_(self.itm_head.weight[1:])
        self.rank_head.bias.copy_(self.itm_head.bias[1:])

    # -- inputs ------------------------------------------------------------------------------------
    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float [N,3,S,S], S = config.image_size, CLIP-normalised. Bicubic with
        antialiasing, like METER's CLIP transform (PIL bicubic)."""
        pixels = images.float() / 255.0
        size = self.meter_config.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False,
                                   antialias=True).clamp_(0.0, 1.0)
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device)
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device)
        return (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    def tokenize(self, captions: list[str]) -> dict:
        if self.tokenizer is None:
            raise ValueError("this METER teacher has no tokenizer: build it with tokenizer_dir")
        return super().tokenize(captions)

    # -- compute -----------------------------------------------------------------------------------
    def image_tokens_for_fusion(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[I, 1 + patches, hidden]: image tower, projection to the fusion width, image token type."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.preprocess_images(pixel_values)
        tokens = self.image_to_fusion(self.image_tower(pixel_values))
        return tokens + self._modality_embedding(IMAGE_TOKEN_TYPE, tokens)

    def text_tokens_for_fusion(self, input_ids, attention_mask) -> torch.Tensor:
        """[T, L, hidden]: text tower, projection to the fusion width, text token type."""
        tokens = self.text_to_fusion(self.text_tower(input_ids, attention_mask))
        return tokens + self._modality_embedding(TEXT_TOKEN_TYPE, tokens)

    def _modality_embedding(self, token_type: int, like: torch.Tensor) -> torch.Tensor:
        # Through the Embedding's forward rather than `.weight[...]`: a ZeRO-3 engine gathers a
        # module's parameters in its forward hooks (teacher.py's contract); a bare weight access from
        # the parent would rely on DeepSpeed noticing it some other way.
        return self.modality_embeddings(torch.tensor([token_type], device=like.device))

    def fuse(self, image_tokens, text_tokens, text_keep) -> torch.Tensor:
        """Aligned rows -> [N, 2*hidden] = [text_pooled, image_pooled] (METER's cls_feats order)."""
        text, image = text_tokens, image_tokens
        for text_layer, image_layer in zip(self.text_fusion_layers, self.image_fusion_layers):
            # Both sides read the other side's states from the previous layer.
            text, image = (text_layer(text, image, text_keep, None),
                           image_layer(image, text, None, text_keep))
        return torch.cat([self.text_pooler(text), self.image_pooler(image)], dim=-1)

    def _score_pairs(self, pixel_values, input_ids, attention_mask, image_index, text_index):
        # Towers run once per unique image / caption; only the fusion runs per pair.
        image_tokens = self.image_tokens_for_fusion(pixel_values)[image_index]
        text_tokens = self.text_tokens_for_fusion(input_ids, attention_mask)[text_index]
        text_keep = attention_mask.bool()[text_index]
        return self.rank_head(self.fuse(image_tokens, text_tokens, text_keep))[:, 0]

    def config_dict(self) -> dict:
        return {"meter": asdict(self.meter_config)}

    @classmethod
    def from_pretrained(cls, folder) -> MeterTeacher:
        """A folder written by save_pretrained (its own tokenizer/ when it has one)."""
        return build_meter_teacher(str(folder), None)



def meter_config_from_state_dict(mapped: dict, base: MeterConfig | None = None) -> MeterConfig:
    """Sizes read from a mapped METER state dict (image size and patch from the position table and the
    patch convolution, layer counts, widths, vocabulary). Head counts cannot be read from weights: the
    base preset's are kept where the width matches it, else width // 64 (CLIP's and BERT's rule)."""
    base = base or meter_clip16_roberta_config()

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in mapped if k.startswith(prefix)})

    def heads(width: int, base_width: int, base_heads: int) -> int:
        return base_heads if width == base_width else max(1, width // 64)

    patch = mapped[IMAGE_PREFIX + "embeddings.patch_embedding.weight"]
    positions = mapped[IMAGE_PREFIX + "embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    vision_width, patch_size = patch.shape[0], patch.shape[-1]
    text = "text_tower.encoder."
    text_width = mapped[text + "embeddings.word_embeddings.weight"].shape[1]
    type_vocab = mapped[text + "embeddings.token_type_embeddings.weight"].shape[0]
    hidden = mapped["text_to_fusion.weight"].shape[0]
    # RoBERTa has a single token type, BERT two: the only difference the weights show. The padding id
    # (RoBERTa numbers positions after it) is the base preset's unless the text model kind changed.
    text_kind = "roberta" if type_vocab == 1 else "bert"
    if text_kind == base.text_kind:
        pad_token_id = base.pad_token_id
    else:
        pad_token_id = 1 if text_kind == "roberta" else 0
    return MeterConfig(**{
        **asdict(base),
        "image_size": grid * patch_size, "patch_size": patch_size, "vision_width": vision_width,
        "vision_layers": count(IMAGE_PREFIX + "encoder.layers."),
        "vision_heads": heads(vision_width, base.vision_width, base.vision_heads),
        "vision_intermediate": mapped[IMAGE_PREFIX + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        "text_kind": text_kind, "pad_token_id": pad_token_id, "type_vocab_size": type_vocab,
        "vocab_size": mapped[text + "embeddings.word_embeddings.weight"].shape[0],
        "text_width": text_width, "text_layers": count(text + "encoder.layer."),
        "text_heads": heads(text_width, base.text_width, base.text_heads),
        "text_intermediate": mapped[text + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": mapped[text + "embeddings.position_embeddings.weight"].shape[0],
        "hidden_size": hidden, "fusion_layers": count("text_fusion_layers."),
        "fusion_heads": heads(hidden, base.hidden_size, base.fusion_heads),
        "fusion_intermediate": mapped["text_fusion_layers.0.ffn_in.weight"].shape[0]})


# ----------------------------------------------------------------------------------------------------
# Building

def _check_tokenizer_fits(tokenizer, config: MeterConfig, what: str) -> None:
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(f"{what}: tokenizer has {len(tokenizer)} tokens, the text tower "
                         f"{config.vocab_size}")


def _preset_config(name: str, tokenizer) -> MeterConfig:
    if name == "meter-tiny":
        if tokenizer is None:
            raise ValueError("meter-tiny needs tokenizer_dir (the data tokenizer sets its vocabulary)")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return meter_tiny_config(vocab_size=len(tokenizer), pad_token_id=pad)
    if name == "meter-clip16-roberta":
        return meter_clip16_roberta_config()
    raise ValueError(f"unknown METER teacher spec: {name} (presets: {', '.join(sorted(PRESETS))})")


def build_meter_teacher(spec_or_folder, tokenizer_dir=None) -> MeterTeacher:
    """A METER teacher from one of:
    - `meter-tiny` (random init; tokenizer_dir = the data tokenizer, which sets the vocabulary);
    - `meter-clip16-roberta` (random init at the published size; tokenizer_dir = a local roberta-base
      tokenizer folder: nothing is downloaded);
    - `PRESET:PATH.ckpt`, e.g. `meter-clip16-roberta:/ckpt/meter_clip16_288_roberta_flickr.ckpt`: an
      official METER checkpoint loaded strictly (no missing or unknown keys) into the preset, with the
      sizes read from its weights (the image size from its position table: the published
      fine-tuning ran at 384 px); a bare `PATH.ckpt` means `meter-clip16-roberta:PATH.ckpt`;
    - a folder written by save_pretrained (its own tokenizer/ wins over tokenizer_dir)."""
    spec = str(spec_or_folder)
    path = Path(spec)
    if path.is_dir():
        saved = json.loads((path / "config.json").read_text())
        if saved.get("backend") != BACKEND_NAME:
            raise ValueError(f"{spec}: config.json backend is {saved.get('backend')!r}, not 'meter'")
        config = MeterConfig.from_dict(saved["meter"])
        if (path / "tokenizer").is_dir():
            tokenizer = load_tokenizer(path / "tokenizer")
        else:
            tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
        from safetensors.torch import load_file
        weights = load_file(str(path / "model.safetensors"))
    else:
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
        if spec.startswith("meter-") and ":" in spec:
            preset, checkpoint = spec.split(":", 1)
        elif path.suffix == ".ckpt":
            preset, checkpoint = "meter-clip16-roberta", spec
        else:
            preset, checkpoint = spec, None
        if checkpoint:
            if not Path(checkpoint).is_file():
                raise ValueError(f"METER checkpoint not found: {checkpoint}")
            weights = load_meter_checkpoint(checkpoint)
            config = meter_config_from_state_dict(weights, _preset_config(preset, tokenizer))
        else:
            config, weights = _preset_config(spec, tokenizer), None

    _check_tokenizer_fits(tokenizer, config, spec)
    teacher = MeterTeacher(config, tokenizer=tokenizer)
    if weights is not None:
        teacher.load_state_dict(weights, strict=True)
    return teacher
