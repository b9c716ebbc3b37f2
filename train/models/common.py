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
               ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json"))


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
