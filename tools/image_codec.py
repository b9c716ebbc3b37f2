"""Images into the JPEG bytes a shard stores: any PIL mode to RGB, bounded size, at most one lossy
re-encoding (tools/make_shards.py writes what these return)."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 64_000_000  # refuse decompression bombs rather than exhaust memory
MAX_ASPECT = 20.0


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: grayscale, 16-bit, palette, RGBA (on white), CMYK, ..."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def encode_image(data, max_side: int | None, quality: int) -> tuple:
    """(jpeg bytes, (width, height)) or raises ValueError with a skip reason.

    A valid RGB JPEG that needs no resizing is stored as is (no second lossy encoding).
    """
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data)
        data = None
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > MAX_PIXELS:
                    raise ValueError("image_too_large")
                img.load()  # full decode: catches truncated files that open() accepts
        except ValueError:
            raise
        except Exception:
            raise ValueError("unreadable_image")
    w, h = img.size
    if w < 2 or h < 2 or max(w, h) / min(w, h) > MAX_ASPECT:
        raise ValueError("bad_image_size")
    scale = max_side / min(w, h) if max_side and min(w, h) > max_side else 1.0
    if data is not None and scale == 1.0 and img.format == "JPEG" and img.mode == "RGB":
        return data, (w, h)
    img = to_rgb(img)
    if scale != 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC,
                         reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.size
