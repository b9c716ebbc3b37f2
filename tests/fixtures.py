"""Tiny fixtures in the real formats, for tests of the data path (and anyone else's).

Every builder writes under a folder it is given (pytest's tmp_path) and returns the paths that
tools/make_shards.py takes. Images are a few pixels: the formats matter here, not the content.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")  # the venv's launcher


def image_bytes(mode: str = "RGB", size=(24, 16), fmt: str = "JPEG", seed: int = 0) -> bytes:
    """An encoded image in a given PIL mode: RGB, L, RGBA, CMYK, I;16, P, LA."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    else:
        img = rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


CORRUPT_JPEG = image_bytes()[:60]  # a header, then nothing: opens, fails to decode
NOT_AN_IMAGE = b"this is not an image at all"


def write_images(folder: Path, specs: dict) -> None:
    """specs: file name -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in specs.items():
        (folder / name).write_bytes(data)


def odd_images() -> dict:
    """One image per odd mode (each must be converted to RGB), plus a corrupt one."""
    return {"rgb.jpg": image_bytes("RGB", seed=1), "gray.png": image_bytes("L", fmt="PNG", seed=2),
            "rgba.png": image_bytes("RGBA", fmt="PNG", seed=3), "cmyk.jpg": image_bytes("CMYK", seed=4),
            "deep.png": image_bytes("I;16", fmt="PNG", seed=5), "pal.png": image_bytes("P", fmt="PNG", seed=6),
            "corrupt.jpg": CORRUPT_JPEG}


def make_karpathy(root: Path):
    """(json path, image folder) in the Karpathy split format; 6 train/restval, 1 val, 1 test,
    plus one corrupt image and one image whose captions are all blank."""
    images = root / "flickr30k-images"
    files = odd_images()
    files["blank.jpg"] = image_bytes(seed=7)
    files["val.jpg"] = image_bytes(seed=8)
    files["test.jpg"] = image_bytes(seed=9)
    write_images(images, files)
    split_of = {"val.jpg": "val", "test.jpg": "test", "gray.png": "restval"}
    entries = []
    for i, name in enumerate(files):
        sentences = [{"raw": "   ", "tokens": []}] if name == "blank.jpg" else \
            [{"raw": f"A photo number {i} called {name.split('.')[0]} .", "tokens": []},
             {"raw": f"Another caption of image {i} .", "tokens": []}]
        entries.append({"filename": name, "imgid": i, "split": split_of.get(name, "train"),
                        "sentences": sentences, "sentids": [2 * i, 2 * i + 1]})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, images


def make_coco(root: Path):
    """(json path, image folder) in the COCO captions format; one image has no caption."""
    images = root / "val2017"
    write_images(images, {"000000000139.jpg": image_bytes(seed=1), "000000000285.jpg": image_bytes("L", seed=2),
                          "000000000632.jpg": image_bytes(seed=3)})
    data = {"info": {}, "licenses": [],
            "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 16, "width": 24},
                       {"id": 285, "file_name": "000000000285.jpg", "height": 16, "width": 24},
                       {"id": 632, "file_name": "000000000632.jpg", "height": 16, "width": 24}],
            "annotations": [{"id": 1, "image_id": 139, "caption": "A woman stands in a kitchen."},
                            {"id": 2, "image_id": 139, "caption": "A kitchen with a person."},
                            {"id": 3, "image_id": 285, "caption": "A big brown bear."}]}
    path = root / "captions_val2017.json"
    path.write_text(json.dumps(data))
    return path, images


def make_table(root: Path, kind: str = "tsv"):
    """(table path, image root) for kind tsv | csv | jsonl; two rows share an image, one row has
    an empty caption, one names a missing file."""
    images = root / "imgs"
    write_images(images, {"a.jpg": image_bytes(seed=1), "b.png": image_bytes("RGBA", fmt="PNG", seed=2),
                          "c.jpg": image_bytes(seed=3)})
    rows = [("a.jpg", "a dog on the grass"), ("b.png", "a cat, sleeping"), ("a.jpg", "the dog runs"),
            ("c.jpg", "  "), ("missing.jpg", "a caption of nothing")]
    path = root / f"pairs.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    else:
        import csv
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if kind == "tsv" else ",")
            w.writerow(["filepath", "caption"])
            w.writerows(rows)
    return path, images


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_img2dataset(root: Path):
    """An img2dataset output folder: 00000.tar, 00001.tar (+ _stats.json, .parquet-less);
    5 good samples, one corrupt image, one sample with an empty caption."""
    folder = root / "img2dataset_out"
    folder.mkdir(parents=True)
    samples = [
        [("000000000", image_bytes(seed=1), "a red car"), ("000000001", image_bytes("L", seed=2), "a gray sky"),
         ("000000002", CORRUPT_JPEG, "broken"), ("000000003", image_bytes(seed=3), "")],
        [("000010000", image_bytes(seed=4), "a boat"), ("000010001", image_bytes(seed=5), "two boats"),
         ("000010002", image_bytes(seed=6), "a harbour at night")],
    ]
    for shard, rows in enumerate(samples):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for key, img, caption in rows:
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                        "caption": caption, "width": 24, "height": 16, "original_width": 240,
                        "original_height": 160, "error_message": None}
                add_member(tar, f"{key}.jpg", img)
                add_member(tar, f"{key}.txt", caption.encode())
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": len(rows)}}))
    return folder


def make_synthetic_shards(out: Path, train: int = 64, val: int = 16, test: int = 0, maxcount: int = 16,
                          tokenizer: bool = False, seed: int = 0, image_size: int = 32) -> Path:
    """Small synthetic shards written by make_shards itself (in-process, no progress bar)."""
    from tools import make_shards
    argv = ["--source", "synthetic", "--out", str(out), "--train-images", str(train),
            "--val-images", str(val), "--test-images", str(test), "--maxcount", str(maxcount),
            "--image-size", str(image_size), "--seed", str(seed), "--quiet"]
    if not tokenizer:
        argv.append("--no-tokenizer")
    assert make_shards.main(argv) == 0
    return out


def write_raw_shard(path: Path, samples: list) -> None:
    """A shard from raw members: samples = [(key, {ext: bytes})], for corrupt-sample tests."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                add_member(tar, f"{key}.{ext}", data)


def write_manifest(folder: Path, split: str, shards: list, counts: list) -> None:
    (folder / f"{split}.json").write_text(json.dumps(
        {"split": split, "shards": shards, "shard_counts": counts, "num_samples": sum(counts),
         "num_captions": sum(counts), "skipped": {}}))


def free_port() -> int:
    """A free TCP port on loopback, for the launcher's --master_port: tests that run beside other
    distributed jobs (or each other) must not all take DeepSpeed's default 29500."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env(**extra) -> dict:
    """The environment of a launched training run: one thread per rank, nothing from the hub, any
    DeepSpeed op that JIT-compiles cached in the repo (scripts/setup.sh's place for them)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


def two_rank_command(args) -> list:
    """`deepspeed --num_gpus 2 train/run.py ARGS` on a free master port."""
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train/run.py", *args]


PHOTO_COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 200), "yellow": (220, 200, 40)}


def make_photo_folder(root: Path, count: int = 24, nested: bool = True) -> tuple:
    """(image folder, CSV of captions): `count` non-square photos-like pictures (a coloured disc or
    box on a noisy background, 48x32 to 80x56, JPEG and PNG, some in sub-folders), each with a
    caption naming its colour and shape. Real formats only: what a user's camera folder holds."""
    from PIL import ImageDraw
    rng = np.random.default_rng(0)
    images = root / "photos"
    rows = []
    for i in range(count):
        colour = list(PHOTO_COLOURS)[i % len(PHOTO_COLOURS)]
        shape = ("disc", "box")[(i // len(PHOTO_COLOURS)) % 2]
        w, h = int(rng.integers(48, 81)), int(rng.integers(32, 57))
        noise = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)
        img = Image.fromarray(noise, "RGB")
        box = [w // 4, h // 4, 3 * w // 4, 3 * h // 4]
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "disc" else draw.rectangle)(box, fill=PHOTO_COLOURS[colour])
        name = f"{'trip' + str(i % 3) + '/' if nested else ''}img{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(images / name)
        rows.append((name, f"a {colour} {shape} on a grey background"))
    table = root / "photos.csv"
    with open(table, "w", newline="") as f:
        import csv
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return images, table


def zero_to_fp32_matches_export(run: Path, exported: str, tmp: Path, script: bool = True) -> int:
    """DeepSpeed's own zero_to_fp32 on a run's `{run}/checkpoints` gives the weights the run exported
    to `{run}/{exported}/model.safetensors`, bit for bit (fp32 training: the master weights are the
    model's). `script`: the zero_to_fp32.py DeepSpeed saved beside the checkpoints, as the README
    runs it; else the library call. Returns the number of tensors compared."""
    import subprocess

    import torch
    from safetensors.torch import load_file
    checkpoints = run / "checkpoints"
    if script:
        out = tmp / f"fp32-{run.name}"
        result = subprocess.run([sys.executable, str(checkpoints / "zero_to_fp32.py"), str(checkpoints),
                                 str(out), "--safe_serialization"], env=run_env(), capture_output=True,
                                text=True, timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        rebuilt = load_file(str(out / "model.safetensors"))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        rebuilt = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints))
    weights = load_file(str(run / exported / "model.safetensors"))
    # The export saves a tied tensor once (train/models/common.py, standalone_state_dict);
    # zero_to_fp32 names it under each of its names: every exported tensor must be there.
    assert set(weights) <= set(rebuilt), sorted(set(weights) - set(rebuilt))
    for name, tensor in weights.items():
        assert torch.equal(rebuilt[name].to(tensor.dtype), tensor), name
    return len(weights)


def clip_folder(tokenizer, folder, save_tokenizer: bool = True):
    """A tiny CLIPModel saved by transformers itself (32 px, 16-d), with the tokenizer unless told not."""
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37, max_position_embeddings=48,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=37),
        projection_dim=16)
    CLIPModel(config).save_pretrained(str(folder))
    if save_tokenizer:
        tokenizer.save_pretrained(str(folder))
    return folder


def vtde_folder(tokenizer, folder, save_tokenizer: bool = True):
    """A tiny VisionTextDualEncoderModel (CLIP vision + BERT text) saved by transformers itself."""
    from transformers import (BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig,
                              VisionTextDualEncoderModel)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37),
        BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=37, max_position_embeddings=48), projection_dim=16)
    VisionTextDualEncoderModel(config=config).save_pretrained(str(folder))
    if save_tokenizer:
        tokenizer.save_pretrained(str(folder))
    return folder
