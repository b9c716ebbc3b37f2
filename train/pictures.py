"""Small pictures for people to look at: image tiles, wrapped text tiles, frames, grids, base64 PNG.

Used by TensorBoard pictures during training (train/monitor.py's callers) and by the contact sheets
of tools/search.py and tools/evaluate.py.
"""
from __future__ import annotations

import base64
import io
import textwrap
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

TILE = 128  # pixels per image tile on contact sheets (small synthetic images are enlarged)


def _font():
    return ImageFont.load_default()


def to_pil(pixels: torch.Tensor, size: int = TILE) -> Image.Image:
    """uint8 [3, H, W] -> RGB picture of size x size (nearest-neighbour: small scenes stay crisp)."""
    array = pixels.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return Image.fromarray(array, "RGB").resize((size, size), Image.NEAREST)


def text_tile(lines: Sequence[str], width: int, height: int, colors: Optional[Sequence[str]] = None,
              background: str = "white") -> Image.Image:
    """Wrapped text lines on a tile; each line may have its own colour."""
    tile = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(tile)
    chars_per_line = max(8, width // 7)
    y = 3
    for index, line in enumerate(lines):
        color = colors[index] if colors else "black"
        for piece in textwrap.wrap(line, chars_per_line) or [""]:
            if y > height - 11:
                return tile
            draw.text((4, y), piece, fill=color, font=_font())
            y += 12
    return tile


def framed(picture: Image.Image, color: Optional[str], width: int = 4) -> Image.Image:
    """A coloured frame (green = correct, red = wrong) drawn inside the picture's edge."""
    if color is None:
        return picture
    picture = picture.copy()
    ImageDraw.Draw(picture).rectangle([0, 0, picture.width - 1, picture.height - 1], outline=color,
                                      width=width)
    return picture


def stack(pictures: Sequence[Image.Image], horizontal: bool, gap: int = 4) -> Image.Image:
    """Pictures side by side (or one under another) on a light grey background."""
    if horizontal:
        size = (sum(p.width for p in pictures) + gap * (len(pictures) - 1), max(p.height for p in pictures))
    else:
        size = (max(p.width for p in pictures), sum(p.height for p in pictures) + gap * (len(pictures) - 1))
    canvas = Image.new("RGB", size, (230, 230, 230))
    offset = 0
    for picture in pictures:
        canvas.paste(picture, (offset, 0) if horizontal else (0, offset))
        offset += (picture.width if horizontal else picture.height) + gap
    return canvas


def png_base64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def ranking_picture(rows: Sequence[dict], text_width: int = 360) -> Image.Image:
    """One row per query: its image, then the candidate captions as the teacher ranked them, each
    with the teacher's score and the student's own rank (green: a caption of that image).
    A row: {"pixels": uint8 [3, H, W], "captions": [str], "teacher": [float], "student_rank": [int],
    "own": [bool]}, candidates already in the teacher's order."""
    tiles = []
    for row in rows:
        lines = [f"{i + 1}. t={t:+.2f} s#{r}  {c}" for i, (t, r, c) in
                 enumerate(zip(row["teacher"], row["student_rank"], row["captions"]))]
        colors = ["green" if own else "black" for own in row["own"]]
        text = text_tile(["teacher's ranking of the student's proposals:"] + lines, text_width, TILE + 40,
                         colors=["gray"] + colors)
        tiles.append(stack([to_pil(row["pixels"]), text], horizontal=True))
    return stack(tiles, horizontal=False, gap=8)
