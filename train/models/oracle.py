"""A ground-truth teacher for the synthetic scenes: the upper bound of what any teacher can pass on.

    --teacher scene-oracle:shards/synthetic

It scores a pair (image, caption) by whether the caption is TRUE of the image's scene (+margin) or
not (-margin), reading the scene from the shards' metadata and the caption with
`train.synthetic.reader.read_caption`. Nothing is learned. It answers the question the DCD ablation
leaves open when DCD does not beat the contrastive student: is the teacher the bottleneck (then DCD from
this oracle wins), or the student and the budget (then even a perfect teacher does not help)?
It also knows what no learned teacher here does: which captions of OTHER images are true of an
image (the data's false negatives), and every binding.

How pairs reach it is the same as for any teacher (`CrossEncoder` contract), so DCD runs unchanged:
- images arrive as the loader's uint8 pixels (kept exact by `preprocess_images`) and are recognised
  by a hash of their bytes, built once from every split of the shards;
- captions are "tokenized" into one id each: the index of the caption in the sorted list of every
  distinct caption of the shards. All ranks build the same list, so ids survive the all-to-all that
  moves candidates between ranks.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from train.models.teacher import CrossEncoder

SPEC_PREFIX = "scene-oracle:"
MARGIN = 5.0  # logits +5 / -5: at KD temperature 1 nearly all teacher mass sits on true captions


def _pixels_key(pixels_chw: torch.Tensor) -> bytes:
    return hashlib.blake2b(pixels_chw.contiguous().numpy().tobytes(), digest_size=16).digest()


def _split_manifests(shards_dir: Path) -> list:
    """(split, manifest) for every split of a shards folder (a `{split}.json` listing shards)."""
    from train import data
    manifests = []
    for path in sorted(shards_dir.glob("*.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
            manifests.append((path.stem, data.load_manifest(shards_dir, path.stem)))
    return manifests


class SceneOracle(CrossEncoder):
    backend = "scene-oracle"

    def __init__(self, shards_dir, margin: float = MARGIN):
        from train import samples
        from train.synthetic import reader, scenes

        shards_dir = Path(shards_dir)
        manifests = _split_manifests(shards_dir)
        if not manifests:
            raise ValueError(f"scene-oracle: no split manifest ({{split}}.json) in {shards_dir}")
        synthetic = [m for _, m in manifests if m.get("source") == "synthetic" and m.get("image_size")]
        if len(synthetic) != len(manifests):
            raise ValueError(f"scene-oracle: {shards_dir} is not made by make_shards --source synthetic "
                             f"(its manifests name no synthetic source and image size)")
        image_size = int(synthetic[0]["image_size"])
        encoded_images, captions = [], set()  # (image bytes, tuple of SceneObject); every caption
        for _, manifest in manifests:
            for path in manifest["paths"]:
                for raw in samples.read_shard(path):
                    try:
                        meta = samples.sample_meta(raw)
                        image = samples.image_bytes(raw)
                        texts = samples.sample_captions(raw, meta)
                    except samples.SampleError:
                        continue  # a corrupt sample never reaches a teacher either
                    objects = (meta.get("source") or {}).get("objects")
                    if objects is None:
                        raise ValueError(f"scene-oracle: sample {raw.get('__key__')} of {path} has no "
                                         f"source.objects in its json")
                    encoded_images.append((image, tuple(
                        scenes.SceneObject(o["shape"], o["colour"], o["size"], (o["row"], o["col"]))
                        for o in objects)))
                    captions.update(texts)
        super().__init__(tokenizer=None, max_length=1, image_size=image_size,
                         image_mean=[0.0] * 3, image_std=[1.0] * 3)
        self._scenes = scenes
        self._encoded_images = encoded_images
        self._scene_tables = {}  # image size -> {pixel hash: scene}
        self.captions = sorted(captions)
        self.caption_id = {text: i + 1 for i, text in enumerate(self.captions)}  # 0 pads
        self.claims = [None] + [reader.read_caption(text) for text in self.captions]
        # the one parameter: DeepSpeed wraps only modules that have parameters (and broadcasts them
        # as bytes, which a 0-dim tensor cannot be viewed as)
        self.margin = nn.Parameter(torch.tensor([float(margin)]), requires_grad=False)

    def preprocess_images(self, pixels):
        return pixels.float()  # exact uint8 values: the hash must see the loader's bytes

    def tokenize(self, captions):
        unknown = [c for c in captions if c not in self.caption_id]
        if unknown:
            raise ValueError(f"scene-oracle: caption {unknown[0]!r} is not in the shards it was built from")
        ids = torch.tensor([[self.caption_id[c]] for c in captions], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _scene_table(self, size: int) -> dict:
        """Pixel hash -> scene for images decoded at `size` (the loader's --image-size may differ
        from the size the shards were written at), built on first use."""
        if size not in self._scene_tables:
            from train.samples import decode_image
            self._scene_tables[size] = {
                _pixels_key(torch.from_numpy(decode_image(image, size))): scene
                for image, scene in self._encoded_images}
        return self._scene_tables[size]

    def scene(self, pixel_values_one: torch.Tensor):
        table = self._scene_table(int(pixel_values_one.shape[-1]))
        key = _pixels_key(pixel_values_one.detach().cpu().round().to(torch.uint8))
        if key not in table:
            raise ValueError("scene-oracle: an image that is not in the shards it was built from")
        return table[key]

    def truth(self, pixel_values, input_ids, image_index, text_index) -> torch.Tensor:
        """bool [N]: caption text_index[n] is true of image image_index[n]."""
        scenes_by_row = {}
        caption_ids = input_ids[:, 0].tolist()  # one conversion, not a tensor index per pair
        out = []
        for image, text in zip(image_index.tolist(), text_index.tolist()):
            if image not in scenes_by_row:
                scenes_by_row[image] = self.scene(pixel_values[image])
            out.append(self._scenes.claim_holds(self.claims[caption_ids[text]], scenes_by_row[image]))
        return torch.tensor(out, dtype=torch.bool, device=pixel_values.device)

    def _score_pairs(self, pixel_values, input_ids, attention_mask, image_index, text_index):
        true = self.truth(pixel_values, input_ids, image_index, text_index)
        margin = self.margin[0].to(pixel_values.device)
        return torch.where(true, margin, -margin)

    def config_dict(self):
        return {"backend": self.backend, "margin": float(self.margin[0])}


def build_scene_oracle(spec: str) -> SceneOracle:
    shards_dir = spec[len(SPEC_PREFIX):]
    if not shards_dir or not Path(shards_dir).is_dir():
        raise ValueError(f"teacher {spec!r}: give the synthetic shards folder, e.g. "
                         f"{SPEC_PREFIX}shards/synthetic ({shards_dir or 'nothing'} is not a folder)")
    return SceneOracle(shards_dir)
