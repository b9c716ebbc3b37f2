"""Cross-encoder teachers: one interface, two backends here (FiLM, ViLT); METER lives in meter.py.

A cross-encoder scores an (image, caption) pair jointly. The interface (docs/ARCHITECTURE.md):

    logits = teacher(pixel_values, input_ids, attention_mask, image_index, text_index)   # [N]

scores the pairs (image_index[n], text_index[n]) of I unique images and T unique captions; without
indices row n of the images pairs with row n of the texts. `forward` is the only compute entry, so a
ZeRO-3 engine (which gathers parameters through submodule forward hooks) sees every parameter used.
The masked-word head is reached through the same forward with `task="mlm"`.

Each teacher prepares its own inputs from the raw batch: `preprocess_images(uint8)` resizes and
normalises, `tokenize(captions)` uses the teacher's own tokenizer and maximum length.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.common import (TOKENIZER_DIR, has_tokenizer_files, load_tokenizer, load_weights,
                                 read_config, resize_and_normalize, tokenize_captions, with_coordinates,
                                 write_model_folder)


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


# ----------------------------------------------------------------------------------------------
# FiLM backend: the CPU teacher (PLATFORM_NOTES: learns the synthetic binding in CPU minutes)

def conv_relu(in_channels, out_channels, stride, norm="none"):
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    if norm == "none":
        return nn.Sequential(conv, nn.ReLU(inplace=True))
    if norm == "batch":
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
    raise ValueError(f"unknown FiLM stem norm {norm!r} (expected none or batch)")


class CoordinateStem(nn.Module):
    """Image-only stem, run once per unique image: RGB + (x, y) coordinate channels -> 8x8 x 64 at 64 px.
    The coordinate channels let later layers tell left from right and top from bottom."""

    def __init__(self, channels=(32, 32, 64, 64), strides=(2, 1, 2, 2), norm="none"):
        super().__init__()
        layers, in_channels = [], 5
        for out_channels, stride in zip(channels, strides):
            layers.append(conv_relu(in_channels, out_channels, stride, norm))
            in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.out_channels = in_channels

    def forward(self, images):
        return self.layers(with_coordinates(images))


class CaptionGRU(nn.Module):
    """Bidirectional GRU over the caption, run once per unique caption.

    Returns per-token states [T, L, 2H] (for the masked-word head) and the caption vector [T, 2H]
    (final states of both directions). Packing makes both independent of how much padding there is."""

    def __init__(self, vocab_size, embed_dim=64, hidden=128, pad_token_id=0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_token_id)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, input_ids, attention_mask):
        lengths = attention_mask.sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        states, final = self.gru(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True,
                                                     total_length=input_ids.shape[1])
        caption = torch.cat([final[0], final[1]], dim=-1)
        return states, caption


class FilmGenerator(nn.Module):
    """Caption vector -> (gamma, beta) for every FiLM block. Small init keeps 1+gamma near 1 and beta
    near 0 at the start, so the blocks begin as plain residual conv blocks. Not too small: the
    caption reaches the score only through these weights, and with std 0.01 training sat on a
    plateau for 10-40 steps on a tiny batch (~120 steps on the scenes); 0.03 left it within ~20."""

    def __init__(self, in_dim, num_blocks, channels, init_std=0.03):
        super().__init__()
        self.num_blocks, self.channels = num_blocks, channels
        self.proj = nn.Linear(in_dim, num_blocks * 2 * channels)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, caption):
        return self.proj(caption).view(-1, self.num_blocks, 2, self.channels)


def make_block_norm(kind, channels):
    if kind == "group":
        return nn.GroupNorm(8, channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown FiLM block norm {kind!r} (expected group, batch or none)")


class ConvNorm(nn.Conv2d):
    """3x3 conv, then a normalisation without affine. In eval mode a BatchNorm is folded into the
    conv's weights (one op instead of two). A subclass of Conv2d so that the weights stay where
    they were (`blocks.i.conv.weight`) and a ZeRO-3 engine gathers them in this module's own hook."""

    def __init__(self, channels, norm="batch"):
        super().__init__(channels, channels, 3, padding=1)
        self.norm = make_block_norm(norm, channels)

    def forward(self, x):
        norm = self.norm
        if (isinstance(norm, nn.BatchNorm2d) and not self.training and not norm.training
                and norm.running_mean is not None):
            scale = torch.rsqrt(norm.running_var + norm.eps)
            weight = self.weight * scale[:, None, None, None]
            bias = (self.bias - norm.running_mean) * scale
            return self._conv_forward(x, weight, bias)
        return norm(super().forward(x))


class FilmBlock(nn.Module):
    """Residual block of the FiLM paper: 1x1 conv, 3x3 conv, normalisation without affine, then the
    caption's scale * x + shift (scale = 1 + gamma), ReLU, residual.

    BatchNorm by default, as in the FiLM paper: it learned the binding a little faster than
    GroupNorm(8) here (62.6 vs 60.3% twin accuracy at step 300, same recipe otherwise) and folds into
    the conv in eval mode. Only training-mode scores depend on the batch; every use of a trained
    teacher (validation, distillation, evaluation) runs in eval mode on the running statistics, so
    each pair's score is independent of what else is scored with it. `block_norm="group"` remains.

    Everything before the modulation depends on the image alone: given `index`, `x` holds one row
    per unique image and the block computes that part once per image, then expands it to the pairs
    (the first block of a pair-scoring call; later blocks get one row per pair)."""

    def __init__(self, channels, norm="batch"):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, 1)
        self.conv = ConvNorm(channels, norm)

    def forward(self, x, scale=None, shift=None, index=None, pre=None):
        """Without scale/shift: the pre-modulation features only (to compute once and pass as `pre`)."""
        h = self.conv(F.relu(self.conv_in(x))) if pre is None else pre
        if scale is None:
            return h
        if index is not None:  # index_select: several times faster than x[index] on CPU
            x, h = x.index_select(0, index), h.index_select(0, index)
        h = F.relu(torch.addcmul(shift, h, scale), inplace=True)
        if torch.is_grad_enabled():
            return x + h
        return h.add_(x)


class FilmHead(nn.Module):
    """1x1 conv 128, max + mean pool (max finds "is there a red circle here", mean counts), MLP -> 1."""

    def __init__(self, in_channels, channels=128, hidden=128):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 1)
        self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 1))
        self.pooled_dim = 2 * channels

    def pool(self, x):
        h = F.relu(self.conv(x))
        return torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1)

    def forward(self, x):
        pooled = self.pool(x)
        return self.mlp(pooled).squeeze(-1), pooled


class MaskedWordHead(nn.Module):
    """Predicts masked caption tokens from the GRU state fused with the pooled FiLM'd image: the
    colour or shape word that was masked out can only be recovered by looking at the image."""

    def __init__(self, text_dim, image_dim, vocab_size, hidden=128):
        super().__init__()
        self.fuse = nn.Sequential(nn.Linear(text_dim + image_dim, hidden), nn.GELU(),
                                  nn.LayerNorm(hidden))
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, token_states, pooled_image):
        image = pooled_image[:, None, :].expand(-1, token_states.shape[1], -1)
        return self.out(self.fuse(torch.cat([token_states, image], dim=-1)))


FILM_DEFAULTS = dict(image_size=64, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                     max_length=40, stem_channels=[32, 32, 64, 64], stem_strides=[2, 1, 2, 2],
                     num_blocks=4, word_dim=64, gru_hidden=128, head_channels=128, head_hidden=128,
                     masked_word_head=True, block_norm="batch", stem_norm="batch", film_init_std=0.03)


class FilmCrossEncoder(CrossEncoder):
    """Image-only stem once per unique image, caption GRU once per unique caption, then per pair
    4 FiLM residual blocks at 8x8 and a small head: scoring many candidates per image is cheap."""

    backend = "film"

    def __init__(self, config, tokenizer):
        cfg = dict(FILM_DEFAULTS, **config)
        super().__init__(tokenizer, cfg["max_length"], cfg["image_size"], cfg["image_mean"],
                         cfg["image_std"])
        cfg["vocab_size"] = cfg.get("vocab_size") or len(tokenizer)
        cfg["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cfg = cfg
        self.stem = CoordinateStem(cfg["stem_channels"], cfg["stem_strides"], cfg["stem_norm"])
        channels = self.stem.out_channels
        self.caption_encoder = CaptionGRU(cfg["vocab_size"], cfg["word_dim"], cfg["gru_hidden"],
                                          cfg["pad_token_id"])
        self.film = FilmGenerator(self.caption_encoder.out_dim, cfg["num_blocks"], channels,
                                  cfg["film_init_std"])
        self.blocks = nn.ModuleList(FilmBlock(channels, cfg["block_norm"]) for _ in range(cfg["num_blocks"]))
        self.head = FilmHead(channels, cfg["head_channels"], cfg["head_hidden"])
        self.word_head = (MaskedWordHead(self.caption_encoder.out_dim, self.head.pooled_dim,
                                         cfg["vocab_size"]) if cfg["masked_word_head"] else None)

    @property
    def has_masked_word_head(self):
        return self.word_head is not None

    # pairs per slice of a no-grad scoring call: per-pair activations of ~256 pairs stay in cache
    # (one call of 4,352 pairs ran ~2x faster sliced than whole, 1 thread)
    pairs_per_slice = 256

    def zero3_partitioned(self) -> bool:
        """Whether a ZeRO-3 engine partitioned the parameters. It then gathers a submodule's
        parameters with a collective at every call, so every rank must call every submodule equally
        often: the slice count then comes from the largest pair count over the ranks."""
        return any(hasattr(p, "ds_id") for p in self.stem.parameters())

    def _slice_count(self, num_pairs: int, device) -> int:
        count = -(-num_pairs // self.pairs_per_slice)
        if self.zero3_partitioned():
            # Ranks score different pair counts (DCD de-duplicates per rank); the MAX makes every
            # rank run the same number of slices, so the blocks' parameter gathers stay matched.
            count_tensor = torch.tensor([count], device=device)
            torch.distributed.all_reduce(count_tensor, op=torch.distributed.ReduceOp.MAX)
            count = int(count_tensor.item())
        return max(count, 1)

    def _fused_features(self, image_features, film_params, image_index, text_index, first_pre=None):
        """FiLM blocks over the pairs (image_index[n], text_index[n]): the stem features and FiLM
        vectors come once per unique image / caption; the first block's pre-modulation convs run
        per image (or come as `first_pre`); only the modulated part onwards runs per pair."""
        params = film_params.index_select(0, text_index)               # [N, blocks, 2, C]
        scale = (params[:, :, 0] + 1.0)[..., None, None]               # [N, blocks, C, 1, 1]
        shift = params[:, :, 1][..., None, None]
        x = image_features
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block(x, scale[:, 0], shift[:, 0], image_index, pre=first_pre)
            else:
                x = block(x, scale[:, i], shift[:, i])
        return x

    def _score_pairs(self, pixel_values, input_ids, attention_mask, image_index, text_index):
        if torch.is_grad_enabled():  # teacher training: one graph over the pairs
            image_features = self.stem(pixel_values).contiguous(memory_format=torch.channels_last)
            (film_params,) = self.encode_text_side(input_ids, attention_mask)
            logits, _ = self.head(self._fused_features(image_features, film_params, image_index, text_index))
            return logits
        image_side = self.encode_image_side(pixel_values)
        text_side = self.encode_text_side(input_ids, attention_mask)
        slices = self._slice_count(image_index.numel(), image_index.device)
        return self._score_in_slices(image_side, text_side, image_index, text_index, slices)

    def _score_in_slices(self, image_side, text_side, image_index, text_index, slices):
        image_features, first_pre = image_side
        (film_params,) = text_side
        return torch.cat([
            self.head(self._fused_features(image_features, film_params, images, texts, first_pre))[0]
            for images, texts in zip(image_index.tensor_split(slices), text_index.tensor_split(slices))])

    splits_unimodal = True

    def encode_image_side(self, pixel_values):
        """(stem features, first block's pre-modulation features): [I, C, 8, 8] each."""
        image_features = self.stem(pixel_values).contiguous(memory_format=torch.channels_last)
        return image_features, self.blocks[0](image_features)

    def encode_text_side(self, input_ids, attention_mask):
        """(FiLM vectors [T, blocks, 2, C],)."""
        _, caption = self.caption_encoder(input_ids, attention_mask)
        return (self.film(caption),)

    def score_encoded(self, image_side, text_side, image_index, text_index):
        slices = self._slice_count(image_index.numel(), image_index.device)
        return self._score_in_slices(image_side, text_side, image_index, text_index, slices)

    def _masked_word_logits(self, pixel_values, input_ids, attention_mask):
        if self.word_head is None:
            raise NotImplementedError("this FiLM teacher was built without a masked-word head")
        token_states, caption = self.caption_encoder(input_ids, attention_mask)
        index = torch.arange(input_ids.shape[0], device=input_ids.device)
        fused = self._fused_features(self.stem(pixel_values), self.film(caption), index, index)
        _, pooled = self.head(fused)
        return self.word_head(token_states, pooled)

    def config_dict(self):
        return dict(self.cfg)

    @classmethod
    def from_pretrained(cls, folder):
        folder = Path(folder)
        config = read_config(folder)
        # folders saved before the norms were configurable hold GroupNorm blocks and a plain stem
        config.setdefault("block_norm", "group")
        config.setdefault("stem_norm", "none")
        model = cls(config, load_tokenizer(folder / TOKENIZER_DIR))
        return load_weights(model, folder)


# ----------------------------------------------------------------------------------------------
# ViLT backend: Hugging Face ViltForImageAndTextRetrieval behind the interface

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


# ----------------------------------------------------------------------------------------------
# loading any saved teacher folder

def load_teacher_folder(folder):
    """A folder written by CrossEncoder.save_pretrained: dispatch on its "backend"."""
    config = read_config(folder)
    backend = config.get("backend")
    if backend == "film":
        return FilmCrossEncoder.from_pretrained(folder)
    if backend == "vilt":
        return ViltCrossEncoder.from_pretrained(folder)
    if backend == "meter":
        from train.models import meter  # lazy: METER pulls in more of transformers
        return meter.build_meter_teacher(str(folder), None)
    raise ValueError(f"teacher folder {folder} has unknown backend {backend!r}")


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())

