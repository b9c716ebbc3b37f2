"""An evaluation gallery in memory (`EvalSplit`): uint8 pixels once per image, the captions flattened
with their image's index, twins, keys and a content fingerprint; read from shards with
`read_eval_split`, or built from tensors (the tests). train/evaluation.py computes on it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch



@dataclass
class EvalSplit:
    """An evaluation gallery: images once each, captions flattened with their image's index."""
    pixels: torch.Tensor               # uint8 [I, 3, S, S]
    captions: List[str]                # [T]
    caption_image_index: torch.Tensor  # long [T]: gallery index of each caption's image
    image_ids: torch.Tensor            # long [I]: dataset image ids
    twin_index: torch.Tensor           # long [I]: gallery index of the twin image, -1 when none here
    keys: List[str]                    # [I]: shard sample keys
    name: str = "split"
    fingerprint: str = field(default="")  # content hash; filled in by __post_init__ when empty

    def __post_init__(self):
        self.caption_image_index = torch.as_tensor(self.caption_image_index, dtype=torch.long)
        self.image_ids = torch.as_tensor(self.image_ids, dtype=torch.long)
        self.twin_index = torch.as_tensor(self.twin_index, dtype=torch.long)
        if not self.fingerprint:
            self.fingerprint = content_fingerprint(self.pixels, self.captions, self.caption_image_index)

    @property
    def num_images(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def has_twins(self) -> bool:
        return bool((self.twin_index >= 0).any())

    def captions_of(self, image: int) -> List[str]:
        return [self.captions[t] for t in torch.nonzero(self.caption_image_index == image).flatten()]

    def subset(self, num_images: int, captions_per_image: Optional[int] = None) -> "EvalSplit":
        """The first `num_images` images with their own captions (the first few of each, if asked)."""
        num_images = min(num_images, self.num_images)
        keep = self.caption_image_index < num_images
        if captions_per_image is not None:
            keep &= _position_within_image(self.caption_image_index) < captions_per_image
        kept = torch.nonzero(keep).flatten()
        twins = self.twin_index[:num_images]
        twins = torch.where(twins < num_images, twins, torch.full_like(twins, -1))
        return EvalSplit(pixels=self.pixels[:num_images],
                         captions=[self.captions[t] for t in kept.tolist()],
                         caption_image_index=self.caption_image_index[kept],
                         image_ids=self.image_ids[:num_images], twin_index=twins,
                         keys=self.keys[:num_images], name=self.name)

    @classmethod
    def from_batches(cls, batches: Iterable[dict], name: str = "split") -> "EvalSplit":
        """Collect eval batches (train/data.py `iterate_eval`) into one gallery."""
        pixels, captions, caption_image, image_ids, twin_ids, keys = [], [], [], [], [], []
        for batch in batches:
            for own_captions in batch["captions"]:
                caption_image.extend([len(image_ids)] * len(own_captions))
                captions.extend(own_captions)
                image_ids.append(-1)  # counts this image; the batch's real ids replace it below
            image_ids[-len(batch["captions"]):] = torch.as_tensor(batch["image_ids"]).tolist()
            pixels.append(batch["pixels"])
            twin_ids.extend(torch.as_tensor(batch["twin_ids"]).tolist())
            keys.extend(batch["keys"])
        if not pixels:
            raise ValueError(f"no images in {name}")
        return cls(pixels=torch.cat(pixels), captions=captions,
                   caption_image_index=torch.tensor(caption_image, dtype=torch.long),
                   image_ids=torch.tensor(image_ids, dtype=torch.long),
                   twin_index=twin_gallery_index(image_ids, twin_ids), keys=keys, name=name)


def _position_within_image(caption_image_index: torch.Tensor) -> torch.Tensor:
    """For each caption, how many earlier captions belong to the same image (0 for the first)."""
    positions = torch.empty_like(caption_image_index)
    seen: Dict[int, int] = {}
    for t, image in enumerate(caption_image_index.tolist()):
        positions[t] = seen.get(image, 0)
        seen[image] = positions[t].item() + 1
    return positions


def twin_gallery_index(image_ids: Sequence[int], twin_ids: Sequence[int]) -> torch.Tensor:
    """Map each image's twin image id to its gallery index; -1 when there is none or it is absent."""
    position = {int(image_id): i for i, image_id in enumerate(image_ids)}
    return torch.tensor([position.get(int(twin), -1) if twin is not None and int(twin) >= 0 else -1
                         for twin in twin_ids], dtype=torch.long)


def read_manifest(shards_dir, split: str) -> dict:
    path = Path(shards_dir) / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {path} (write shards with tools/make_shards.py)")
    return json.loads(path.read_text())


def read_eval_split(shards_dir, split: str, image_size: Optional[int] = None,
                    max_images: Optional[int] = None, batch_size: int = 256) -> EvalSplit:
    """Load a shard split written by tools/make_shards.py into memory (rank 0 of 1: every rank
    needs every caption; the work is split across ranks when scoring)."""
    from train import data  # imported here so this module (and its tests) need not load WebDataset

    manifest = read_manifest(shards_dir, split)
    image_size = image_size or manifest.get("image_size")
    if not image_size:
        raise ValueError(f"{split}.json names no image_size: pass the image size explicitly")
    batches = data.iterate_eval(str(shards_dir), split, batch_size, int(image_size), rank=0,
                                world_size=1, max_images=max_images)
    return EvalSplit.from_batches(batches, name=split)


def content_fingerprint(pixels: torch.Tensor, captions: Sequence[str],
                        caption_image_index: torch.Tensor) -> str:
    """Hash of what a model sees: exact, so regenerated shards with other content never hit a stale
    cache, and a copy of the same data in another folder still does."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(pixels.contiguous().cpu().numpy().tobytes())
    digest.update("\x1f".join(captions).encode())
    digest.update(caption_image_index.cpu().numpy().tobytes())
    return digest.hexdigest()
