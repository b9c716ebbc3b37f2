"""Cross-encoder teachers: the interface every backend implements, and the registry of backends.

Backends: FiLM (film.py), ViLT (vilt.py), METER (meter.py), the scene oracle (oracle.py). Each
subclasses CrossEncoder and registers itself with `@register_teacher`, under the name its saved
config.json carries as "backend"; train/models/presets.py builds and loads them by spec.

A cross-encoder scores an (image, caption) pair jointly. The interface (docs/ARCHITECTURE.md):

    logits = teacher(pixel_values, input_ids, attention_mask, image_index, text_index)   # [N]

scores the pairs (image_index[n], text_index[n]) of I unique images and T unique captions; without
indices row n of the images pairs with row n of the texts. `forward` is the only compute entry, so a
ZeRO-3 engine (which gathers parameters through submodule forward hooks) sees every parameter used.
The masked-word head is reached through the same forward with `task="mlm"`.

Each teacher prepares its own inputs from the raw batch: `preprocess_images(uint8)` resizes and
normalises, `tokenize(captions)` uses the teacher's own tokenizer and maximum length.
"""
import torch
import torch.nn as nn

from train.models.common import resize_and_normalize, tokenize_captions, write_model_folder

# ----------------------------------------------------------------------------------------------
# the registry: backend name -> class (with `from_pretrained(folder)` for its saved folders)

TEACHER_BACKENDS = {}


def register_teacher(cls):
    """Class decorator on a CrossEncoder subclass: registered under its `backend` name."""
    TEACHER_BACKENDS[cls.backend] = cls
    return cls


# ----------------------------------------------------------------------------------------------
# the interface

class CrossEncoder(nn.Module):
    """Base class: pair indexing, input preparation, save/load. Backends implement `_score_pairs`
    (and optionally `_masked_word_logits`) and `config_dict`."""

    backend = "base"

    def __init__(self, tokenizer, max_length, image_size, image_mean, image_std):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    # -- inputs
    def preprocess_images(self, pixels):
        return resize_and_normalize(pixels, self.image_size, self.image_mean, self.image_std)

    def tokenize(self, captions):
        return tokenize_captions(self.tokenizer, captions, self.max_length)

    # -- compute
    def forward(self, pixel_values, input_ids, attention_mask, image_index=None, text_index=None,
                task="match"):
        """task="match": matching logits [N] of the indexed pairs (rows aligned when no indices).
        task="mlm": masked-word logits [N, L, V] of aligned pairs (indices ignored)."""
        if task == "mlm":
            return self._masked_word_logits(pixel_values, input_ids, attention_mask)
        if task != "match":
            raise ValueError(f"unknown teacher task {task!r} (expected 'match' or 'mlm')")
        image_index, text_index = self._pair_indices(pixel_values, input_ids, image_index, text_index)
        return self._score_pairs(pixel_values, input_ids, attention_mask, image_index, text_index)

    def masked_word_logits(self, pixel_values, input_ids, attention_mask):
        """Convenience for eager use; under an engine call engine(..., task="mlm") instead."""
        return self(pixel_values, input_ids, attention_mask, task="mlm")

    @staticmethod
    def _pair_indices(pixel_values, input_ids, image_index, text_index):
        if (image_index is None) != (text_index is None):
            raise ValueError("give both image_index and text_index, or neither")
        if image_index is None:
            if pixel_values.shape[0] != input_ids.shape[0]:
                raise ValueError(f"aligned scoring needs as many images ({pixel_values.shape[0]}) "
                                 f"as captions ({input_ids.shape[0]}); pass pair indices otherwise")
            index = torch.arange(pixel_values.shape[0], device=input_ids.device)
            return index, index
        return image_index.long(), text_index.long()

    def _score_pairs(self, pixel_values, input_ids, attention_mask, image_index, text_index):
        raise NotImplementedError

    # -- scoring from cached unimodal parts. A backend whose score splits into an image-only part,
    # a caption-only part and a per-pair part sets `splits_unimodal` and implements the three
    # methods below: evaluation and rerank then encode each image and caption ONCE for a whole
    # gallery and only the per-pair part runs per pair (what makes rerank's k pairs per query cheap:
    # without it every 256-pair call re-encoded ~256 captions). Sides are tuples of tensors with one
    # row per image / caption, so they can be encoded in batches and concatenated.
    splits_unimodal = False

    def encode_image_side(self, pixel_values):
        raise NotImplementedError(f"the {self.backend} teacher does not split off its image side")

    def encode_text_side(self, input_ids, attention_mask):
        raise NotImplementedError(f"the {self.backend} teacher does not split off its text side")

    def score_encoded(self, image_side, text_side, image_index, text_index):
        """Logits [N] of the pairs (image_side row image_index[n], text_side row text_index[n])."""
        raise NotImplementedError(f"the {self.backend} teacher does not score encoded sides")

    def _masked_word_logits(self, pixel_values, input_ids, attention_mask):
        raise NotImplementedError(f"the {self.backend} teacher has no masked-word head")

    @property
    def has_masked_word_head(self):
        return False

    # -- persistence
    def config_dict(self):
        raise NotImplementedError

    def save_pretrained(self, folder):
        config = dict(self.config_dict(), backend=self.backend)
        write_model_folder(self, folder, config, self.tokenizer)
