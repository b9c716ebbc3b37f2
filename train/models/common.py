"""What teachers and students share: the saved-folder layout, tokenizer loading, image and caption
preparation. Every model module imports this one; it imports no model module.

A saved model folder holds config.json + model.safetensors (+ tokenizer/), for teachers and students
alike; `read_config` / `write_model_folder` / `load_weights` read and write it.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"

# OpenAI CLIP's pixel statistics (CLIP students and METER's "clip" transforms normalise with them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def normalize(x, mean, std):
    """float [N,3,H,W] in [0, 1] -> (x - mean) / std per channel."""
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def resize_like_pil(pixels, size):
    """uint8 [N,3,H,W] -> float [N,3,h,w] in [0, 255], resized as PIL's BICUBIC resize (what the
    transformers image processors call): torch's antialiased bicubic uses PIL's kernel (a=-0.5) and
    support, also when enlarging; PIL resizes the width first and stores that pass as uint8
    (clamped, rounded), which matters at edges where bicubic overshoots, so this does too. The
    result is clamped, not rounded: within half a level of PIL except where PIL's fixed-point
    intermediate and ours round a tie apart (a few pixels in 10^5, at most ~1.5 levels)."""
    height, width = size
    x = pixels.double()
    if x.shape[-1] != width:
        x = F.interpolate(x, size=(x.shape[-2], width), mode="bicubic", align_corners=False, antialias=True)
        x = torch.floor(x.clamp(0.0, 255.0) + 0.5)
    if x.shape[-2] != height:
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 255.0).float()


def centre_crop(x, size):
    """The central size x size window, offsets rounded as transformers' center_crop rounds them."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def shorter_side_size(height, width, size):
    """(h, w) with the shorter side `size` and the aspect kept, the longer side truncated as
    transformers' get_resize_output_image_size(default_to_square=False) truncates it."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_crop_normalize(pixels, size, mean, std):
    """uint8 [N,3,H,W] -> float [N,3,size,size]: shorter side to `size`, centre crop, mean/std.
    The training loader crops the same way (train/samples.py) and so does CLIPImageProcessor
    (resize shortest_edge, center_crop), so an exported student sees a photo as training did."""
    x = resize_like_pil(pixels, shorter_side_size(*pixels.shape[-2:], size))
    return normalize(centre_crop(x, size) / 255.0, mean, std)


def resize_and_normalize(pixels, size, mean, std):
    """uint8 [N,3,H,W] -> float [N,3,size,size] normalised with per-channel mean/std.

    Antialiasing matters when shrinking (e.g. 384 -> 64): without it thin edges alias away."""
    x = pixels.float() / 255.0
    if x.shape[-2:] != (size, size):
        shrinking = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=shrinking)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def load_tokenizer(folder):
    """A tokenizer saved with save_pretrained (transformers 5: never BertTokenizer(vocab_file=...),
    which silently maps every word to [UNK])."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def has_tokenizer_files(folder):
    folder = Path(folder)
    return any((folder / name).exists() for name in
               ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model",
                "sentencepiece.bpe.model"))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def require_tokenizer(name_or_folder, override, what):
    """The tokenizer a pretrained model reads with: the `--tokenizer FOLDER` override when given,
    else the model's own (its folder's files, or its hub id). Never the shards' tokenizer in
    silence: a model trained on another vocabulary reads nonsense with it."""
    if override is not None:
        return load_tokenizer(override)
    path = Path(name_or_folder)
    if path.is_dir():
        if has_tokenizer_files(path):
            return load_tokenizer(path)
        raise ValueError(f"{what} {name_or_folder} has no tokenizer files (tokenizer.json, vocab.txt, "
                         f"spiece.model, ...): give --tokenizer FOLDER")
    try:
        return load_tokenizer(name_or_folder)
    except Exception as error:  # offline hub, no tokenizer in that repo: the same one line
        raise ValueError(f"{what} {name_or_folder}: no tokenizer ({_first_line(error)}); give "
                         f"--tokenizer FOLDER") from None


def tokenize_captions(tokenizer, captions, max_length):
    # Lists, then one torch.tensor each: return_tensors="pt" took twice as long (0.25 vs 0.12 s
    # for 5,000 captions), a quarter of the student's whole 1,000 x 5,000 evaluation.
    encoded = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length)
    return {"input_ids": torch.tensor(encoded["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(encoded["attention_mask"], dtype=torch.long)}


def read_config(folder):
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"no {CONFIG_NAME} in model folder {folder}")
    return json.loads(path.read_text())


def read_project_config(folder, backend):
    """config.json of a folder this project saved for `backend`; any other folder fails loudly
    (a transformers folder, another backend's folder) instead of loading as something else."""
    config = read_config(folder)
    found = config.get("backend")
    if found == backend:
        return config
    if found is None:
        raise ValueError(f"{folder} is a transformers {config.get('model_type')!r} folder, not this "
                         f"project's {backend!r} format: load it with train.models.presets "
                         f"(build_teacher / build_student) or its own transformers class")
    raise ValueError(f"{folder} holds a {found!r} model, not a {backend!r} one")


def write_processor_config(folder, processor_config):
    """preprocessor_config.json, as the transformers image processors read it."""
    path = Path(folder) / "preprocessor_config.json"
    path.write_text(json.dumps(processor_config, indent=2, sort_keys=True))


def write_model_folder(model, folder, config, tokenizer):
    """config.json + model.safetensors (+ tokenizer/): the layout shared by teacher and student."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(standalone_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))


def with_coordinates(images):
    """Append x and y coordinate channels in [-1, 1]: convolutions are translation-invariant, and
    the captions talk about left / right / above / below."""
    n, _, h, w = images.shape
    ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
    xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x, grid_y]).unsqueeze(0).expand(n, -1, -1, -1)
    return torch.cat([images, coords], dim=1)


def standalone_state_dict(model):
    """The state dict with every tensor in its own storage, tied tensors saved once.

    DeepSpeed ZeRO-1/2 turns parameters into views of one flat buffer, which safetensors'
    save_model refuses ("None is covering the entire storage"); cloning each tensor fixes that.
    Truly tied tensors (same data pointer and shape) keep only their first name; `load_model`
    restores the tie on load.
    """
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    return tensors


def load_weights(model, folder):
    load_model(model, str(Path(folder) / WEIGHTS_NAME), strict=True)
    return model
