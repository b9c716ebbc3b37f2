"""One sample of a shard: reading a tar's samples, parsing their json and captions, decoding the image.

A corrupt sample raises SampleError with the reason it is counted under (SKIP_REASONS); the streams
of train/data.py skip it and count it, never fail on it. A damaged tar is logged and its remaining
samples skipped ("damaged_shard").
"""
from __future__ import annotations

import io
import json
import logging
import warnings
import zlib
from collections import Counter
from typing import Iterator

import numpy as np
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 64_000_000
MAX_ASPECT = 20.0


class SampleError(Exception):
    """One corrupt sample; `args[0]` is the reason it is counted under."""


# Every reason a sample is counted under (ranks sum their counts in this order).
SKIP_REASONS = ("damaged_shard", "bad_json", "bad_text", "empty_caption", "missing_image", "bad_image",
                "bad_image_size")



def read_shard(path, skipped: Counter | None = None) -> Iterator[dict]:
    """Raw samples {"__key__", "jpg", "json", ...} of one tar; a damaged tar is counted, not fatal."""
    def handler(exn):
        if skipped is not None:
            skipped["damaged_shard"] += 1
        log.warning("damaged shard %s: %s", path, exn)
        return True  # skip what is unreadable and go on
    yield from wds.tariterators.tarfile_samples([{"url": str(path)}], handler=handler)


def sample_meta(raw: dict) -> dict:
    """Parsed json of a raw sample with int image_id; raises SampleError('bad_json')."""
    if "__meta__" in raw:
        return raw["__meta__"]
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("image_id"), int):
            raise ValueError
    except (KeyError, ValueError, UnicodeDecodeError):
        raise SampleError("bad_json")
    raw["__meta__"] = meta
    return meta


def sample_captions(raw: dict, meta: dict) -> list:
    captions = [c.strip() for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
    if not captions and "txt" in raw:
        try:
            text = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SampleError("bad_text")
        captions = [text] if text else []
    elif "txt" in raw:
        try:  # a txt that is not UTF-8 marks a damaged sample even when json has captions
            raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError("bad_text")
    if not captions:
        raise SampleError("empty_caption")
    return captions


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """uint8 [3, S, S]: RGB, shorter side resized to S, centre crop. Never flipped (captions say
    left and right). Raises SampleError('bad_image' | 'bad_image_size')."""
    import io
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w < 2 or h < 2 or w * h > MAX_PIXELS or max(w, h) / min(w, h) > MAX_ASPECT:
                raise SampleError("bad_image_size")
            if img.format == "JPEG":
                img.draft("RGB", (image_size, image_size))  # decode large JPEGs at reduced scale
            img = img.convert("RGB")
    except SampleError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise SampleError("bad_image_size")  # over PIL's pixel limit (e.g. 10,000 x 10,000)
    except Exception:
        raise SampleError("bad_image")
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def image_bytes(raw: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return raw[ext]
    raise SampleError("missing_image")


def decode_sample(raw: dict, image_size: int) -> dict:
    """pixels, captions, image_id, twin_id, group, key of a raw sample; raises SampleError."""
    meta = sample_meta(raw)
    captions = sample_captions(raw, meta)
    pixels = decode_image(image_bytes(raw), image_size)
    as_id = lambda v: v if isinstance(v, int) else -1
    return {"pixels": pixels, "captions": captions, "image_id": meta["image_id"],
            "twin_id": as_id(meta.get("twin_id")), "group": as_id(meta.get("group")),
            "key": raw["__key__"]}


def pick_caption(captions: list, key: str, seed: int, pass_index: int) -> str:
    """One caption per image per pass; stateless (a hash), so skipping samples costs nothing."""
    return captions[zlib.crc32(f"{seed}:{pass_index}:{key}".encode()) % len(captions)]
