"""The ViLT cross-encoder (backend "vilt"): Hugging Face ViltForImageAndTextRetrieval behind the
CrossEncoder interface; every pair runs the full transformer.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

from train.models.common import (TOKENIZER_DIR, load_tokenizer, load_weights, normalize, read_config,
                                 read_project_config, require_tokenizer, resize_like_pil,
                                 write_processor_config)
from train.models.teacher import CrossEncoder, register_teacher

VILT_MEAN = [0.5, 0.5, 0.5]
VILT_STD = [0.5, 0.5, 0.5]
PROCESSOR_NAME = "preprocessor_config.json"
# ViltImageProcessor's longest side for a given shorter one: 1333/800 of it (its DETR heritage).
VILT_LONGER_RATIO = 1333 / 800


def read_processor_config(folder):
    """The folder's preprocessor_config.json as a dict, or None (hub ids, folders without one)."""
    path = Path(folder) / PROCESSOR_NAME if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def vilt_image_settings(processor, vilt_config):
    """Shorter side and mean/std from a preprocessor_config dict (ViLT's processor: 384 px,
    mean/std 0.5) when there is one, else the model's own image size."""
    size, mean, std = vilt_config.image_size, VILT_MEAN, VILT_STD
    if processor is not None:
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
                 image_std=VILT_STD, masked_word_head=False, processor_config=None):
        """processor_config: the image processor's settings of a teacher that came from a
        transformers folder or hub id; such a teacher is saved back as that model's own folder."""
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
        self.processor_config = processor_config

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
        """ViltImageProcessor's resize: shorter side to image_size, longer side scaled (at most
        1333/800 of it), both rounded down to a multiple of the patch size, bicubic; mean/std."""
        size = vilt_resize_size(*pixels.shape[-2:], self.image_size, self.vilt_config.patch_size)
        return normalize(resize_like_pil(pixels, size) / 255.0, self.image_mean, self.image_std)

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
        """A folder written by save_pretrained: this project's format (backend "vilt"), or the
        transformers folder a teacher that came from transformers is exported as."""
        folder = Path(folder)
        config = read_config(folder)
        if "backend" not in config and config.get("model_type") == "vilt":
            return cls.from_transformers(folder)
        config = read_project_config(folder, cls.backend)
        model = cls.from_config(config["vilt_config"], load_tokenizer(folder / TOKENIZER_DIR),
                                masked_word_head=config.get("masked_word_head", False),
                                image_size=config["image_size"], image_mean=config["image_mean"],
                                image_std=config["image_std"])
        return load_weights(model, folder)

    @classmethod
    def from_transformers(cls, name_or_folder, tokenizer=None):
        """Any ViLT retrieval checkpoint transformers can load (hub id or its own saved folder), with
        its own tokenizer, or the one in the `tokenizer` folder (--tokenizer) when given."""
        from transformers import ViltForImageAndTextRetrieval
        vilt = ViltForImageAndTextRetrieval.from_pretrained(str(name_or_folder))
        words = require_tokenizer(name_or_folder, tokenizer, "ViLT teacher")
        local = Path(name_or_folder).is_dir()
        processor = read_processor_config(name_or_folder if local else None)
        if processor is None:
            processor = vilt_processor_config(vilt.config.image_size, VILT_MEAN, VILT_STD,
                                              vilt.config.patch_size)
        size, mean, std = vilt_image_settings(processor, vilt.config)
        return cls(vilt, words, image_size=size, image_mean=mean, image_std=std,
                   processor_config=processor)

    def save_pretrained(self, folder):
        """A teacher that came from transformers goes back out as a ViltForImageAndTextRetrieval
        folder with its processor (image processor + tokenizer), for plain transformers; the
        project's own ViLT (presets, masked-word head) keeps the project's format."""
        if self.processor_config is None:
            return super().save_pretrained(folder)
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        processor = dict(self.processor_config, image_mean=list(self.image_mean),
                         image_std=list(self.image_std), size={"shortest_edge": self.image_size})
        write_processor_config(folder, processor)
        self.tokenizer.save_pretrained(str(folder))


def vilt_processor_config(image_size, mean, std, size_divisor):
    """ViltImageProcessor's settings, for a teacher whose folder had none."""
    return {"image_processor_type": "ViltImageProcessor", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "do_pad": True, "resample": 3, "rescale_factor": 1 / 255,
            "size": {"shortest_edge": image_size}, "size_divisor": size_divisor,
            "image_mean": list(mean), "image_std": list(std)}


def vilt_resize_size(height, width, shorter, size_divisor):
    """ViltImageProcessor's output size (its get_resize_output_image_size)."""
    longer = int(VILT_LONGER_RATIO * shorter)
    scale = shorter / min(height, width)
    if height < width:
        new_height, new_width = shorter, scale * width
    else:
        new_height, new_width = scale * height, shorter
    if max(new_height, new_width) > longer:
        scale = longer / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    new_height, new_width = int(new_height + 0.5), int(new_width + 0.5)
    return new_height // size_divisor * size_divisor, new_width // size_divisor * size_divisor
