"""The official METER checkpoint's weights -> the names of this project's METER backend (meter.py).

    load_meter_checkpoint(path) -> state dict in the backend's names
    map_meter_state_dict(meter_state_dict) -> the same, from a state dict already in memory
"""
from __future__ import annotations

import torch

#
# Names confirmed in the public METER code (github.com/zdou0830/METER):
# - meter/modules/meter_module.py, METERTransformerSS (the LightningModule whose `state_dict` the .ckpt
#   holds, so keys carry no prefix): `vit_model` (CLIP from clip_model.build_model), `text_transformer`
#   (HF RobertaModel/BertModel), `cross_modal_text_transform` / `cross_modal_image_transform`
#   (nn.Linear to hidden_size), `token_type_embeddings` (nn.Embedding(2, hidden)),
#   `cross_modal_image_layers.N` / `cross_modal_text_layers.N` (BertCrossLayer), `cross_modal_image_pooler`
#   / `cross_modal_text_pooler` (heads.Pooler: `.dense`), `itm_score` (heads.ITMHead: `.fc`,
#   Linear(2*hidden, 2)), `rank_output` (declared Linear(hidden, 1) but its weight is then replaced by
#   `itm_score.fc.weight[1:]`, so the saved tensor is [1, 2*hidden]), `mlm_score` (pre-training only).
#   infer(): text embeddings + encoder layers only (the RoBERTa pooler is never run); image tokens get
#   token type 1, text 0; cls_feats = cat([text_pooled, image_pooled]); retrieval score
#   (objectives.compute_irtr) = rank_output(cls_feats)[:, 0].
# - meter/modules/bert_model.py, BertCrossLayer: `attention.self.{query,key,value}`,
#   `attention.output.{dense,LayerNorm}`, `crossattention.self.{query,key,value}`,
#   `crossattention.output.{dense,LayerNorm}`, `intermediate.dense`, `output.{dense,LayerNorm}`.
# - meter/modules/clip_model.py, CLIP/VisualTransformer (OpenAI CLIP naming): `visual.conv1` (no bias),
#   `visual.class_embedding`, `visual.positional_embedding`, `visual.ln_pre`,
#   `visual.transformer.resblocks.N.{attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_1,
#   mlp.c_fc, mlp.c_proj, ln_2}` (nn.MultiheadAttention packs q, k, v in in_proj), `visual.ln_post`
#   (applied to all tokens). Transformer builds `layers - 1` resblocks. The CLIP class also keeps the
#   text side's `token_embedding`, `positional_embedding` and `ln_final`, which METER never runs.

IMAGE_PREFIX = "image_tower.clip."
_CLIP_BLOCK_PARTS = {  # OpenAI CLIP ResidualAttentionBlock -> HF CLIPEncoderLayer
    "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_CROSS_LAYER_PARTS = {  # METER BertCrossLayer -> CoAttentionLayer
    "attention.self.query": "self_attention.query", "attention.self.key": "self_attention.key",
    "attention.self.value": "self_attention.value", "attention.output.dense": "self_attention.output",
    "attention.output.LayerNorm": "self_attention.norm",
    "crossattention.self.query": "cross_attention.query",
    "crossattention.self.key": "cross_attention.key",
    "crossattention.self.value": "cross_attention.value",
    "crossattention.output.dense": "cross_attention.output",
    "crossattention.output.LayerNorm": "cross_attention.norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm"}
_MODULE_RENAMES = {  # whole METER modules (their .weight/.bias) -> this backend
    "vit_model.visual.conv1": IMAGE_PREFIX + "embeddings.patch_embedding",
    "vit_model.visual.ln_pre": IMAGE_PREFIX + "pre_layrnorm",
    "vit_model.visual.ln_post": IMAGE_PREFIX + "post_layernorm",
    "cross_modal_text_transform": "text_to_fusion",
    "cross_modal_image_transform": "image_to_fusion",
    "token_type_embeddings": "modality_embeddings",
    "cross_modal_text_pooler.dense": "text_pooler.dense",
    "cross_modal_image_pooler.dense": "image_pooler.dense",
    "itm_score.fc": "itm_head",
    "rank_output": "rank_head"}
_TENSOR_RENAMES = {
    "vit_model.visual.class_embedding": IMAGE_PREFIX + "embeddings.class_embedding",
    "vit_model.visual.positional_embedding": IMAGE_PREFIX + "embeddings.position_embedding.weight"}
# Saved by METER but never used by its retrieval forward; dropped by name so anything else unknown
# (another task's head, a different architecture) fails loudly instead of being ignored.
_UNUSED_PREFIXES = (
    "vit_model.token_embedding.", "vit_model.ln_final.",  # CLIP's text side, built but never run
    "text_transformer.pooler.",  # infer() skips the text tower's pooler
    "mlm_score.")  # pre-training masked-LM head
_UNUSED_KEYS = (
    "vit_model.positional_embedding",  # CLIP's text positions
    "text_transformer.embeddings.position_ids")  # arange buffer transformers 4.x saved; recomputed


def _split_module_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def map_meter_state_dict(meter_state: dict) -> dict:
    """METER names -> this backend's names. Splits CLIP's packed q/k/v projections, drops the tensors
    METER saves but never uses (listed above), and derives `rank_head` from the ITM head's "match" row
    when the checkpoint has no `rank_output` (a pre-training checkpoint), as METER does at fine-tuning.
    Raises ValueError naming any key it does not know."""
    mapped, unknown = {}, []
    for key, tensor in meter_state.items():
        if key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES):
            continue
        if key in _TENSOR_RENAMES:
            mapped[_TENSOR_RENAMES[key]] = tensor
            continue
        if key.startswith("text_transformer."):
            # METER's text tower is the Hugging Face model itself: the names are already HF's.
            mapped["text_tower.encoder." + key[len("text_transformer."):]] = tensor
            continue
        module, leaf = _split_module_key(key)
        if module in _MODULE_RENAMES:
            mapped[f"{_MODULE_RENAMES[module]}.{leaf}"] = tensor
            continue
        parts = key.split(".")
        if key.startswith("vit_model.visual.transformer.resblocks.") and len(parts) >= 7:
            block, inner = parts[4], ".".join(parts[5:])
            target = f"{IMAGE_PREFIX}encoder.layers.{block}."
            if inner in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if inner.endswith("weight") else "bias"
                # nn.MultiheadAttention stacks [q; k; v] along dim 0.
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    mapped[f"{target}self_attn.{name}.{kind}"] = chunk.clone()
                continue
            inner_module, inner_leaf = _split_module_key(inner)
            if inner_module in _CLIP_BLOCK_PARTS:
                mapped[f"{target}{_CLIP_BLOCK_PARTS[inner_module]}.{inner_leaf}"] = tensor
                continue
        for side in ("text", "image"):
            prefix = f"cross_modal_{side}_layers."
            if key.startswith(prefix) and len(parts) >= 4:
                index, inner_module = parts[1], ".".join(parts[2:-1])
                if inner_module in _CROSS_LAYER_PARTS:
                    mapped[f"{side}_fusion_layers.{index}.{_CROSS_LAYER_PARTS[inner_module]}."
                           f"{parts[-1]}"] = tensor
                    break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a METER retrieval/pre-training state dict: {len(unknown)} unknown keys, "
                         f"e.g. {unknown[:5]}")
    if "rank_head.weight" not in mapped and "itm_head.weight" in mapped:
        mapped["rank_head.weight"] = mapped["itm_head.weight"][1:].clone()
        mapped["rank_head.bias"] = mapped["itm_head.bias"][1:].clone()
    return mapped


def load_meter_checkpoint(path) -> dict:
    """Read an official METER .ckpt (PyTorch Lightning: {"state_dict": ..., ...}; a bare state dict
    works too) with torch.load(weights_only=True) and return it in this backend's names."""
    import pickle
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it (it pickles more than "
                         f"tensors and plain containers; re-save only its state_dict): {first_line}"
                         ) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: no state_dict of tensors in this checkpoint")
    return map_meter_state_dict(state)
