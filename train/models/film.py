"""The FiLM cross-encoder (backend "film"): the CPU teacher. It learns the synthetic scenes' binding in
CPU minutes (docs/platform_notes.md); scoring many candidates per image is cheap because everything
before the caption's modulation runs once per unique image.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.common import TOKENIZER_DIR, load_tokenizer, load_weights, read_config, with_coordinates
from train.models.teacher import CrossEncoder, register_teacher

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


@register_teacher
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

    # (count, device) -> the count every rank uses: set by whoever partitions this teacher over ranks
    # (train/engine.py's build_teacher_engine sets train.comm.max_over_ranks); the model itself never
    # talks to other ranks.
    agree_slice_count = None

    def _slice_count(self, num_pairs: int, device) -> int:
        count = -(-num_pairs // self.pairs_per_slice)
        if self.zero3_partitioned() and self.agree_slice_count is not None:
            # Ranks score different pair counts (DCD de-duplicates per rank); the MAX makes every
            # rank run the same number of slices, so the blocks' parameter gathers stay matched.
            count = self.agree_slice_count(count, device)
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
