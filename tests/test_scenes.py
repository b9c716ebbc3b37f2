"""The synthetic scene generator: deterministic, accurate captions, twins that differ in binding."""
import random
from collections import Counter

import numpy as np
import pytest

from train.synthetic import reader, scenes


def test_deterministic_by_seed_and_seeds_differ():
    a = list(scenes.generate_split(8, seed=3, image_size=32))
    b = list(scenes.generate_split(8, seed=3, image_size=32))
    c = list(scenes.generate_split(8, seed=4, image_size=32))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    # a range of groups generates alone, identically (make_shards resumes this way)
    tail = list(scenes.generate_split(8, seed=3, image_size=32, start_group=2))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a[4:], tail))


def test_records_images_and_captions():
    items = list(scenes.generate_split(40, seed=0, image_size=64))
    assert len(items) == 40
    for i, (img, rec) in enumerate(items):
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert rec["image_id"] == i and rec["group"] == i // 2 and rec["twin_id"] == i ^ 1
        assert len(rec["captions"]) == 5 and len(rec["false_for_twin"]) == 5
        assert all(1 <= len(c.split()) <= scenes.MAX_WORDS["specific"] for c in rec["captions"])
        assert 2 <= len(rec["objects"]) <= 3
    with pytest.raises(ValueError, match="even"):
        list(scenes.generate_split(3, seed=0))


def test_captions_are_true_for_own_scene_and_mostly_false_for_twin():
    flags = []
    for group in range(60):
        objects, twin, _, _ = scenes.scene_pair(0, group)
        # every template instance is true of the scene it was built from
        for text, claim in scenes.candidate_captions(objects, random.Random(group)):
            assert scenes.claim_holds(claim, objects), text
        for _, rec in scenes.generate_pair(0, group, 32):
            flags += rec["false_for_twin"]
    assert np.mean(flags) > 0.9


def test_captions_name_the_scene_objects():
    for img, rec in scenes.generate_split(60, seed=1, image_size=32):
        colours = {o["colour"] for o in rec["objects"]}
        for caption in rec["captions"]:
            words = set(caption.split())
            named = words & set(scenes.COLOURS)
            assert named and named <= colours, (caption, rec["objects"])


def test_twins_differ_in_pixels_but_share_the_words_of_their_objects():
    items = list(scenes.generate_split(200, seed=2, image_size=32))
    multi = 0
    for (img_a, a), (img_b, b) in zip(items[0::2], items[1::2]):
        assert a["group"] == b["group"] and a["twin_id"] == b["image_id"] and b["twin_id"] == a["image_id"]
        assert not np.array_equal(img_a, img_b)
        assert a["twin_type"] in ("swap_colours", "swap_positions", "swap_shapes", "change_colour", "change_shape")
        if len(a["objects"]) > 1:  # bag of attribute words is identical: only the binding differs
            multi += 1
            bag = lambda r: Counter(w for o in r["objects"] for w in (o["colour"], o["shape"], o["size"]))
            assert bag(a) == bag(b)
            assert sorted(a["objects"], key=str) != sorted(b["objects"], key=str)
    assert multi > 50


def test_relations_follow_grid_cells():
    left = scenes.SceneObject("circle", "red", "small", (0, 0))
    right = scenes.SceneObject("square", "blue", "large", (1, 1))
    assert scenes.spatial_relations(left, right) == ["left", "above"]
    claim = scenes.Claim((scenes.Mention("circle", "red"), scenes.Mention("square", "blue")), ((0, "left", 1),))
    assert scenes.claim_holds(claim, (left, right))
    swapped = (scenes.SceneObject("circle", "blue", "small", (0, 0)), scenes.SceneObject("square", "red", "large", (1, 1)))
    assert not scenes.claim_holds(claim, swapped)


@pytest.mark.parametrize("style", scenes.CAPTION_STYLES)
def test_every_caption_template_says_what_its_claim_says(style):
    """Read each template's text back with the independent reader: over many scenes, the text's
    meaning is true exactly where the template's claim is (a "with ... to its right" template once
    stated the opposite relation of its claim, and truth-checking the claim alone missed it)."""
    pairs = [scenes.scene_pair(5, group, style) for group in range(80)]
    worlds = [p[0] for p in pairs] + [p[1] for p in pairs]
    checked = 0
    for index, objects in enumerate(worlds[:60]):
        for text, claim in scenes.CAPTION_TEMPLATES[style](objects, random.Random(index)):
            stated = reader.read_caption(text)
            assert scenes.claim_holds(stated, objects), text
            for other in worlds:
                assert scenes.claim_holds(stated, other) == scenes.claim_holds(claim, other), (text, other)
                checked += 1
    assert checked > 50_000


def test_read_caption_reads_decoded_text_and_names_what_it_cannot_read():
    claim = reader.read_caption("three shapes: a red circle, a big blue box and a white plus sign")
    assert claim.count == 3 and [m.shape for m in claim.mentions] == ["circle", "square", "cross"]
    assert claim.mentions[1].size == "large" and claim.relations == ()
    claim = reader.read_caption("a green disc with a yellow triangle above it")
    assert claim.relations == ((1, "above", 0),)
    claim = reader.read_caption("the small red circle is on the left of the blue square in the lower right corner")
    assert claim.relations == ((0, "left", 1),) and claim.mentions[1].cell == (1, 1)
    with pytest.raises(ValueError, match="'a red circle near a blue square'.*'near'"):
        reader.read_caption("a red circle near a blue square")
    with pytest.raises(ValueError, match="names no coloured shape"):
        reader.read_caption("a picture of nothing")


def test_partial_style_regenerates_the_first_generator():
    """`--captions partial` keeps the old world: 1-3 objects of the first 4 shapes and 7 colours,
    captions that name only some attributes (so earlier figures stay reproducible)."""
    items = list(scenes.generate_split(200, seed=0, image_size=32, style="partial"))
    counts = Counter(len(rec["objects"]) for _, rec in items)
    assert set(counts) == {1, 2, 3}
    assert {o["shape"] for _, rec in items for o in rec["objects"]} <= set(scenes.SHAPES[:4])
    assert {o["colour"] for _, rec in items for o in rec["objects"]} <= set(list(scenes.COLOURS)[:7])
    with pytest.raises(ValueError, match="caption style"):
        scenes.generate_pair(0, 0, style="vague")


def test_specific_captions_are_true_of_their_own_scene_only():
    """Every specific caption names each object in full and the count, so across a 400-image split
    almost no caption is true of another image (the default's point: true and own coincide)."""
    items = list(scenes.generate_split(400, seed=1, image_size=32))
    objects = [tuple(scenes.SceneObject(o["shape"], o["colour"], o["size"], (o["row"], o["col"]))
                     for o in rec["objects"]) for _, rec in items]
    true_elsewhere, total = 0, 0
    for i, (_, rec) in enumerate(items):
        for caption in rec["captions"]:
            claim = reader.read_caption(caption)
            assert claim.count == len(objects[i]) and len(claim.mentions) == len(objects[i]), caption
            assert all(m.size is not None for m in claim.mentions), caption
            total += 1
            true_elsewhere += any(scenes.claim_holds(claim, o) for j, o in enumerate(objects) if j != i)
    assert true_elsewhere / total < 0.05
