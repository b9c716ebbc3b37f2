"""The ViLT cross-encoder (backend "vilt"): Hugging Face ViltForImageAndTextRetrieval behind the
CrossEncoder interface; every pair runs the full transformer.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.common import TOKENIZER_DIR, has_tokenizer_files, load_tokenizer, load_weights, read_config
from train.models.teacher import CrossEncoder, register_teacher

VILT_MEAN = [0.5, 0.5, 0.5]
VILT_STD = [0.5, 0.5, 0.5]


def vilt_image_settings(folder, vilt_config):
    """Shorter side and mean/std from the folder's preprocessor_config.json (ViLT's processor:
    384 px, mean/std 0.5) when there is one, else the model's own image size."""
    size, mean, std = vilt_config.image_size, VILT_MEAN, VILT_STD
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        processor = json.loads(path.read_text())
        declared = processor.get("size", size)
        size = declared.get("shortest_edge", size) if isinstance(declared, dict) else declared
        mean = processor.get("image_mean", mean)
        std = processor.get("image_std", std)
    if isinstance(size, (list, tuple)):
        size = min(size)
    return int(size), list(mean), list(std)


class VisionLanguageMlmHead(nn.Module):
    """BERT-style masked-word head for a ViLT trained from scratch (the retrieval model has none)."""

    def __init__(self, hidden, vocab_size, eps=1e-12):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, text_states):
        return self.decoder(self.transform(text_states))


@register_teacher
class ViltCrossEncoder(CrossEncoder):
    """Every pair runs the full ViLT transformer (no shared-image cache is possible)."""

    backend = "vilt"

    def __init__(self, vilt_model, tokenizer, image_size=None, image_mean=VILT_MEAN,
                 image_std=VILT_STD, masked_word_head=False):
        vilt_config = vilt_model.config
        max_length = vilt_config.max_position_embeddings
        super().__init__(tokenizer, max_length, image_size or vilt_config.image_size, image_mean, image_std)
        if len(tokenizer) > vilt_config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the ViLT model only "
                             f"{vilt_config.vocab_size} word embeddings")
        self.model = vilt_model
        self.word_head = (VisionLanguageMlmHead(vilt_config.hidden_size, vilt_config.vocab_size,
                                                vilt_config.layer_norm_eps)
                          if masked_word_head else None)

    @property
    def has_masked_word_head(self):
        return self.word_head is not None

    @property
    def vilt_config(self):
        return self.model.config

    def _pixel_mask(self, pixel_values):
        return torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long,
                          device=pixel_values.device)

    def _score_pairs(self, pixel_values, input_ids, attention_mask, image_index, text_index):
        pixels = pixel_values[image_index]
        out = self.model(input_ids=input_ids[text_index], attention_mask=attention_mask[text_index],
                         pixel_values=pixels, pixel_mask=self._pixel_mask(pixels))
        return out.logits[:, 0]

    def _masked_word_logits(self, pixel_values, input_ids, attention_mask):
        if self.word_head is None:
            raise NotImplementedError("this ViLT teacher has no masked-word head (pretrained teachers need none)")
        out = self.model.vilt(input_ids=input_ids, attention_mask=attention_mask,
                              pixel_values=pixel_values, pixel_mask=self._pixel_mask(pixel_values))
        text_states = out.last_hidden_state[:, : input_ids.shape[1]]
        return self.word_head(text_states)

    def preprocess_images(self, pixels):
        """ViLT's processor: shorter side to image_size, longer side scaled (at most 1333/800 of it),
        both rounded down to a multiple of the patch size; mean/std 0.5."""
        h, w = pixels.shape[-2:]
        if h == w:
            return super().preprocess_images(pixels)
        patch = self.vilt_config.patch_size
        short, long = (h, w) if h < w else (w, h)
        new_short = self.image_size
        new_long = min(int(long * new_short / short), int(new_short * 1333 / 800))
        new_short, new_long = (max(patch, new_short // patch * patch), max(patch, new_long // patch * patch))
        size = (new_short, new_long) if h < w else (new_long, new_short)
        x = F.interpolate(pixels.float() / 255.0, size=size, mode="bilinear", align_corners=False,
                          antialias=True)
        mean = torch.tensor(self.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def config_dict(self):
        return {"vilt_config": self.vilt_config.to_dict(), "image_size": self.image_size,
                "image_mean": self.image_mean, "image_std": self.image_std,
                "masked_word_head": self.has_masked_word_head}

    @classmethod
    def from_config(cls, vilt_config_dict, tokenizer, masked_word_head=False, **image_settings):
        """Random init from a ViltConfig dict (presets, and the first step of loading our folders)."""
        from transformers import ViltConfig, ViltForImageAndTextRetrieval
        vilt = ViltForImageAndTextRetrieval(ViltConfig.from_dict(dict(vilt_config_dict)))
        return cls(vilt, tokenizer, masked_word_head=masked_word_head, **image_settings)

    @classmethod
    def from_pretrained(cls, folder):
        """A folder written by our save_pretrained (config.json with backend "vilt")."""
        folder = Path(folder)
        config = read_config(folder)
        model = cls.from_config(config["vilt_config"], load_tokenizer(folder / TOKENIZER_DIR),
                                masked_word_head=config.get("masked_word_head", False),
                                image_size=config["image_size"], image_mean=config["image_mean"],
                                image_std=config["image_std"])
        return load_weights(model, folder)

    @classmethod
    def from_transformers(cls, name_or_folder, tokenizer_dir=None):
        """Any ViLT retrieval checkpoint transformers can load (hub id or its own saved folder).
        Its tokenizer: the BERT tokenizer saved beside it when present, else the data tokenizer."""
        from transformers import ViltForImageAndTextRetrieval
        vilt = ViltForImageAndTextRetrieval.from_pretrained(str(name_or_folder))
        folder = Path(name_or_folder)
        local = folder.is_dir()
        if local and has_tokenizer_files(folder):
            tokenizer = load_tokenizer(folder)
        elif not local:
            tokenizer = load_tokenizer(name_or_folder)
        elif tokenizer_dir is not None:
            tokenizer = load_tokenizer(tokenizer_dir)
        else:
            raise ValueError(f"ViLT folder {folder} has no tokenizer and no data tokenizer was given")
        size, mean, std = vilt_image_settings(folder if local else None, vilt.config)
        return cls(vilt, tokenizer, image_size=size, image_mean=mean, image_std=std)
