"""Synthetic compositional scenes: shapes with colours, sizes and positions on a 2x2 grid.

Two caption styles (``CAPTION_STYLES``), each with its own world:
- ``specific`` (the default): two or three objects from 5 shapes x 9 colours x 2 sizes, and every
  caption names every object in full (size, colour, shape), states how many there are and relates
  them, so a caption is true of its own scene and almost never of another (docs/RESULTS.md: the
  share of test captions true of another test image). Ranking by truth then equals ranking by
  "written for this image", which is what recall measures.
- ``partial``: one to three objects from 4 shapes x 7 colours x 2 sizes, captions that name some
  attributes of some objects ("a red circle"): true of ~55 test images each. Kept so that the
  figures measured on it stay reproducible (``make_shards --captions partial``).

Every scene comes with a *twin* whose binding differs (two objects swap colours, cells or shapes;
a one-object scene changes its colour or shape). Two-and-three-object twins use exactly the same
words, so a bag-of-words model cannot tell them apart, while a model that binds attributes to
objects can. Captions are built from a small structured description (which objects, which
attributes, which relation), checked for truth against the scene, and preferably chosen among
those that are false for the twin.

Deterministic by seed: scene pair `group` depends only on (seed, group), so any range of groups can
be generated on its own (tools/make_shards.py resumes that way). Captions are read back into claims by reader.py.

Never flip these images horizontally: captions say left and right.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (235, 235, 235),
    "pink": (255, 130, 190),
    "cyan": (40, 215, 215),
}
SIZES = ("small", "large")
CELLS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, col) on the 2x2 grid
CELL_NAMES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}

SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"),
               "triangle": ("triangle",), "cross": ("cross", "plus sign"), "diamond": ("diamond",)}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# relation name -> phrases; "left" means the first-mentioned object is left of the second
RELATION_WORDS = {"left": ("to the left of", "left of", "on the left of"),
                  "right": ("to the right of", "right of", "on the right of"),
                  "above": ("above", "over"),
                  "below": ("below", "under", "beneath")}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# "{A} with {B} to its right": the relation is of B relative to A
WITH_PHRASES = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
CELL_PHRASES = {(0, 0): ("in the top left", "in the upper left corner"),
                (0, 1): ("in the top right", "in the upper right corner"),
                (1, 0): ("in the bottom left", "in the lower left corner"),
                (1, 1): ("in the bottom right", "in the lower right corner")}


@dataclass(frozen=True)
class World:
    """What scenes of one caption style are made of (the order of each tuple fixes the draws)."""
    shapes: tuple
    colours: tuple
    object_counts: tuple  # drawn uniformly: repeats weigh a count more


WORLDS = {
    # ~90 object kinds and two or three objects: two random test scenes rarely share every object
    "specific": World(SHAPES, tuple(COLOURS), (2, 3)),
    # the world of the first generator, unchanged so that its shards regenerate bit for bit
    "partial": World(SHAPES[:4], tuple(COLOURS)[:7], (1, 2, 2, 3)),
}
CAPTION_STYLES = tuple(WORLDS)
COUNT_WORDS = {2: "two", 3: "three"}
COUNT_NOUNS = ("shapes", "objects")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple  # (row, col)


@dataclass(frozen=True)
class Mention:
    """What a caption claims about one object; None means the caption does not say."""
    shape: str
    colour: str
    size: str | None = None
    cell: tuple | None = None


@dataclass(frozen=True)
class Claim:
    """A caption's meaning: mentioned objects (distinct scene objects) and relations between them."""
    mentions: tuple
    relations: tuple = ()  # (i, relation, j): mention i is <relation> mention j
    count: int | None = None


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    (ra, ca), (rb, cb) = a.cell, b.cell
    return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def mention_fits(m: Mention, o: SceneObject) -> bool:
    return (m.shape == o.shape and m.colour == o.colour
            and (m.size is None or m.size == o.size) and (m.cell is None or m.cell == o.cell))


def claim_holds(claim: Claim, objects: tuple) -> bool:
    """True if some assignment of mentions to distinct objects satisfies every claim."""
    if claim.count is not None and claim.count != len(objects):
        return False
    for chosen in itertools.permutations(objects, len(claim.mentions)):
        if all(mention_fits(m, o) for m, o in zip(claim.mentions, chosen)) and all(
                relation_holds(chosen[i], rel, chosen[j]) for i, rel, j in claim.relations):
            return True
    return False


def spatial_relations(a: SceneObject, b: SceneObject) -> list:
    return [rel for rel in ("left", "right", "above", "below") if relation_holds(a, rel, b)]


# ---------------------------------------------------------------- captions

def phrase(m: Mention, rng: random.Random, article: str | None = "a") -> str:
    words = []
    if m.size is not None:
        words.append(rng.choice(SIZE_WORDS[m.size]))
    words += [m.colour, rng.choice(SHAPE_WORDS[m.shape])]
    if m.cell is not None:
        words.append(rng.choice(CELL_PHRASES[m.cell]))
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join(([article] if article else []) + words)


def mention_of(o: SceneObject, with_size: bool, with_cell: bool = False) -> Mention:
    return Mention(o.shape, o.colour, o.size if with_size else None, o.cell if with_cell else None)


def candidate_captions(objects: tuple, rng: random.Random) -> list:
    """(text, Claim) pairs true for `objects`, from several templates and synonyms."""
    out = []
    sized = lambda: rng.random() < 0.3  # sizes in some captions only: keeps captions short
    if len(objects) == 1:
        (o,) = objects
        for _ in range(3):
            m = mention_of(o, sized())
            mc = mention_of(o, sized(), with_cell=True)
            out += [(phrase(m, rng), Claim((m,))),
                    (f"a picture of {phrase(m, rng)}", Claim((m,))),
                    (f"{phrase(m, rng)} on a dark background", Claim((m,))),
                    (phrase(mc, rng), Claim((mc,))),
                    (f"there is {phrase(mc, rng)}", Claim((mc,)))]
        return out
    for a_idx, b_idx in itertools.permutations(range(len(objects)), 2):
        a, b = objects[a_idx], objects[b_idx]
        for rel in spatial_relations(a, b):
            ma, mb = mention_of(a, sized()), mention_of(b, sized())
            claim = Claim((ma, mb), ((0, rel, 1),))
            rw = rng.choice(RELATION_WORDS[rel])
            out += [(f"{phrase(ma, rng)} {rw} {phrase(mb, rng)}", claim),
                    (f"{phrase(ma, rng, 'the')} is {rw} {phrase(mb, rng, 'the')}", claim),
                    (f"{phrase(ma, rng, None)} {rw} {phrase(mb, rng, None)}", claim),
                    (f"there is {phrase(ma, rng)} {rw} {phrase(mb, rng)}", claim),
                    # "{B} with {A} to its left": A is left of B, which is the claim (A rel B)
                    (f"{phrase(mb, rng)} with {phrase(ma, rng)} {WITH_PHRASES[rel]}", claim)]
    if len(objects) == 2:
        a, b = objects
        for _ in range(2):
            ma, mb = mention_of(a, True), mention_of(b, True)
            out.append((f"{phrase(ma, rng)} and {phrase(mb, rng)}", Claim((ma, mb))))
            ma, mb = mention_of(a, sized(), True), mention_of(b, sized(), True)
            out.append((f"{phrase(ma, rng)} and {phrase(mb, rng)}", Claim((ma, mb))))
    else:
        for _ in range(2):
            ms = [mention_of(o, sized()) for o in rng.sample(objects, len(objects))]
            text = f"{phrase(ms[0], rng)} , {phrase(ms[1], rng)} and {phrase(ms[2], rng)}"
            out.append((text, Claim(tuple(ms))))
            out.append((f"three shapes : {text[2:] if text.startswith('a ') else text}",
                        Claim(tuple(ms), count=3)))
    return out


def specific_captions(objects: tuple, rng: random.Random) -> list:
    """(text, Claim) pairs that name every object in full, say how many there are, and chain them by
    relations ("two shapes : a small red circle left of a large blue square"; three objects: "A r1 B
    r2 C", read as A r1 B and B r2 C). The count makes the claim exhaustive: a caption of a
    two-object scene is not true of a three-object scene that happens to contain both objects."""
    n = len(objects)
    out = []
    for order in itertools.permutations(objects):
        links = [spatial_relations(order[k], order[k + 1]) for k in range(n - 1)]
        if not all(links):
            continue
        for _ in range(2):
            relations = [rng.choice(options) for options in links]
            mentions = tuple(mention_of(o, with_size=True) for o in order)
            claim = Claim(mentions, tuple((k, rel, k + 1) for k, rel in enumerate(relations)), count=n)
            count = f"{COUNT_WORDS[n]} {rng.choice(COUNT_NOUNS)} :"
            joined = lambda article, joiner="": " ".join(
                [phrase(mentions[0], rng, article)] + [
                    f"{joiner if k == 0 else ''}{rng.choice(RELATION_WORDS[rel])} {phrase(mentions[k + 1], rng, article)}"
                    for k, rel in enumerate(relations)])
            out += [(f"{count} {joined('a')}", claim),
                    (f"{count} {joined('the', 'is ')}", claim),
                    (f"{count} {joined(None)}", claim)]
            if n == 2:  # "{B} with {A} to its left": A (mention 0) is left of B
                out.append((f"{count} {phrase(mentions[1], rng)} with {phrase(mentions[0], rng)} "
                            f"{WITH_PHRASES[relations[0]]}", claim))
    return out


CAPTION_TEMPLATES = {"specific": specific_captions, "partial": candidate_captions}
MAX_WORDS = {"specific": 20, "partial": 16}


def choose_captions(objects: tuple, twin: tuple, rng: random.Random, n: int = 5,
                    style: str = "partial") -> tuple:
    """(n captions true for `objects`, [caption is false for `twin`]), preferring ones false for it.

    Captions longer than the style's `MAX_WORDS` are dropped: caption length drives a
    cross-encoder's cost.
    """
    max_words = MAX_WORDS[style]
    candidates = CAPTION_TEMPLATES[style](objects, rng)
    rng.shuffle(candidates)
    seen, discriminative, others = set(), [], []
    for text, claim in candidates:  # checked lazily: claims are the costly part of generation
        if text in seen or len(text.split()) > max_words or not claim_holds(claim, objects):
            continue
        seen.add(text)
        (others if claim_holds(claim, twin) else discriminative).append(text)
        if len(discriminative) == n:
            break
    ranked = [(t, True) for t in discriminative] + [(t, False) for t in others]
    chosen = ranked[:n]
    while len(chosen) < n:  # tiny candidate sets: repeat rather than return fewer than n
        chosen.append(chosen[len(chosen) % len(chosen)])
    return [t for t, _ in chosen], [d for _, d in chosen]


# ---------------------------------------------------------------- scenes and twins

def random_scene(rng: random.Random, world: World = WORLDS["partial"]) -> tuple:
    n = rng.choice(world.object_counts)
    cells = rng.sample(CELLS, n)
    return tuple(SceneObject(rng.choice(world.shapes), rng.choice(list(world.colours)), rng.choice(SIZES), c)
                 for c in cells)


def make_twin(objects: tuple, rng: random.Random, world: World = WORLDS["partial"]):
    """(twin objects, twin_type) or None when this scene has no binding-changing twin."""
    if len(objects) == 1:
        (o,) = objects
        if rng.random() < 0.5:
            return (replace(o, colour=rng.choice([c for c in world.colours if c != o.colour])),), "change_colour"
        return (replace(o, shape=rng.choice([s for s in world.shapes if s != o.shape])),), "change_shape"
    options = []
    for i, j in itertools.combinations(range(len(objects)), 2):
        a, b = objects[i], objects[j]
        if a.colour != b.colour and (a.shape, a.size) != (b.shape, b.size):
            options.append(("swap_colours", i, j))
        if (a.shape, a.colour, a.size) != (b.shape, b.colour, b.size):
            options.append(("swap_positions", i, j))
        if a.shape != b.shape and (a.colour, a.size) != (b.colour, b.size):
            options.append(("swap_shapes", i, j))
    if not options:
        return None
    kind, i, j = rng.choice(options)
    twin = list(objects)
    a, b = objects[i], objects[j]
    if kind == "swap_colours":
        twin[i], twin[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
    elif kind == "swap_positions":
        twin[i], twin[j] = replace(a, cell=b.cell), replace(b, cell=a.cell)
    else:
        twin[i], twin[j] = replace(a, shape=b.shape), replace(b, shape=a.shape)
    return tuple(twin), kind


def scene_pair(seed: int, group: int, style: str = "specific"):
    """The two scenes of twin group `group`: (objects, twin_objects, twin_type, look), seeded by both."""
    world = WORLDS[style]
    rng = random.Random(f"scenes:{seed}:{group}")
    while True:
        objects = random_scene(rng, world)
        made = make_twin(objects, rng, world)
        if made is not None and sorted(map(str, made[0])) != sorted(map(str, objects)):
            break
    # Shared look (background, jitter, noise seed) so that twins differ only in the binding.
    look = {"background": rng.randint(15, 60),
            "jitter": {c: (rng.uniform(-1, 1), rng.uniform(-1, 1)) for c in CELLS},
            "tint": {c: tuple(rng.randint(-15, 15) for _ in range(3)) for c in CELLS},
            "noise_seed": rng.getrandbits(32)}
    return objects, made[0], made[1], look


# ---------------------------------------------------------------- rendering

def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        w, s = r * 0.35, r
        return [(cx - w, cy - s), (cx + w, cy - s), (cx + w, cy - w), (cx + s, cy - w),
                (cx + s, cy + w), (cx + w, cy + w), (cx + w, cy + s), (cx - w, cy + s),
                (cx - w, cy + w), (cx - s, cy + w), (cx - s, cy - w), (cx - w, cy - w)]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(objects: tuple, look: dict, image_size: int = 64, noise: float = 4.0) -> np.ndarray:
    """uint8 [S,S,3] image of the objects; `look` fixes background, jitter, tint and noise."""
    bg = look["background"]
    img = Image.new("RGB", (image_size, image_size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    cell = image_size / 2
    for o in objects:
        row, col = o.cell
        jx, jy = look["jitter"][o.cell]
        r = cell * (0.40 if o.size == "large" else 0.24)
        slack = cell / 2 - r - 1  # jitter keeps the shape inside its cell, so relations stay true
        cx, cy = (col + 0.5) * cell + jx * slack * 0.8, (row + 0.5) * cell + jy * slack * 0.8
        colour = tuple(min(255, max(0, v + t)) for v, t in zip(COLOURS[o.colour], look["tint"][o.cell]))
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(shape_polygon(o.shape, cx, cy, r), fill=colour)
    if noise <= 0:
        return np.asarray(img, dtype=np.uint8)
    rng = np.random.default_rng(look["noise_seed"])
    pixels = np.asarray(img, dtype=np.float32) + rng.standard_normal((img.height, img.width, 3), dtype=np.float32) * noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def describe(objects: tuple) -> list:
    return [{"shape": o.shape, "colour": o.colour, "size": o.size, "row": o.cell[0], "col": o.cell[1]}
            for o in objects]


def generate_pair(seed: int, group: int, image_size: int = 64, noise: float = 4.0,
                  style: str = "specific"):
    """[(image uint8 [S,S,3], record), (twin image, twin record)] for twin group `group`."""
    if style not in WORLDS:
        raise ValueError(f"caption style {style!r} not in {CAPTION_STYLES}")
    objects, twin, twin_type, look = scene_pair(seed, group, style)
    caption_rng = random.Random(f"captions:{seed}:{group}")
    out = []
    for member, (mine, other) in enumerate(((objects, twin), (twin, objects))):
        captions, false_for_twin = choose_captions(mine, other, caption_rng, style=style)
        record = {"image_id": 2 * group + member, "twin_id": 2 * group + 1 - member, "group": group,
                  "captions": captions, "false_for_twin": false_for_twin,
                  "objects": describe(mine), "twin_type": twin_type}
        out.append((render(mine, look, image_size, noise), record))
    return out


def generate_split(num_images: int, seed: int, image_size: int = 64, start_group: int = 0,
                   noise: float = 4.0, style: str = "specific") -> Iterator[tuple]:
    """Yield (image uint8 [S,S,3], record) for `num_images` images as consecutive twin pairs.

    record: image_id (= 2*group + member), twin_id, group, captions (5), false_for_twin (per caption:
    the caption is wrong for the twin, so it tests binding), objects, twin_type.
    `start_group` skips the first groups without generating them.
    """
    if num_images % 2:
        raise ValueError(f"num_images must be even (twins come in pairs), got {num_images}")
    for group in range(start_group, num_images // 2):
        yield from generate_pair(seed, group, image_size, noise, style)
