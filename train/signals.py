"""Stored teacher signals on disk: a folder beside the shards, written by tools/score_teacher.py and
read by `train/run.py --teacher-signals PATH`.

    PATH/manifest.json      {"version", "teacher": {"spec", "fingerprint"}, "proposer": {...},
                             "splits": {split: {"file", "bytes", "blake2b", "shards_fingerprint",
                             "candidates", "images", "captions", "pairs", "seconds", "pairs_per_s"}}}
    PATH/{split}.pt         the table (train/distill/stored.py StoredSignals), torch.save of tensors

The table is written under a temporary name and renamed, then the manifest names it with its size
and hash: a file that is truncated or replaced after the fact no longer matches its manifest entry.
Every problem is one line naming the file (a ConfigError: exit 2, before any rank trains).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from train.config import ConfigError, read_json_object
from train.distill.stored import TABLE_KEYS, StoredSignals

VERSION = 1
MANIFEST = "manifest.json"
_ROW_KEYS = ("image_ids", "caption_image", "i2t_index", "t2i_index")


class SignalsError(ConfigError):
    """Stored signals that cannot be used for this run; the message names the file."""


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shards_fingerprint(shards_dir, split: str) -> Optional[str]:
    """The split's fingerprint as tools/make_shards.py wrote it in `{split}.json`; None if absent."""
    path = Path(shards_dir) / f"{split}.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    fingerprint = manifest.get("fingerprint") if isinstance(manifest, dict) else None
    if fingerprint is None and isinstance(manifest, dict):  # older shards: what the files are
        fingerprint = hashlib.blake2b(json.dumps([manifest.get("shards"), manifest.get("shard_counts")])
                                      .encode(), digest_size=16).hexdigest()
    return fingerprint


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = read_json_object(path, "teacher-signals manifest (write it with tools/score_teacher.py)")
    except ConfigError as err:
        raise SignalsError(str(err)) from None
    if manifest.get("version") != VERSION or not isinstance(manifest.get("splits"), dict):
        raise SignalsError(f"{path}: not a version-{VERSION} teacher-signals manifest")
    return manifest


def write_split(folder, split: str, signals: StoredSignals, teacher: dict, proposer: dict, entry: dict) -> Path:
    """Write one split's table, then the manifest naming it (other splits kept when the teacher and
    proposer are the same; dropped otherwise, as they no longer belong to this manifest)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / f"{split}.pt"
    # row indices as int32 (a split of 2^31 rows is far off): a third fewer bytes than int64
    tensors = {k: getattr(signals, k) for k in TABLE_KEYS}
    tensors.update({k: tensors[k].int() for k in _ROW_KEYS if k != "image_ids"})
    _write_atomic(table, lambda tmp: torch.save(tensors, tmp))
    manifest = {"version": VERSION, "teacher": teacher, "proposer": proposer, "splits": {}}
    if (folder / MANIFEST).is_file():
        try:
            old = read_manifest(folder)
            if old.get("teacher") == teacher and old.get("proposer") == proposer:
                manifest["splits"] = old["splits"]
        except SignalsError:
            pass  # a broken manifest is replaced
    manifest["splits"][split] = dict(entry, file=table.name, bytes=table.stat().st_size,
                                     blake2b=file_digest(table))
    _write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return table


def load_split(folder, split: str, shards_dir, teacher_fingerprint: Optional[str] = None,
               proposer_fingerprint: Optional[str] = None) -> tuple:
    """(StoredSignals, manifest) of `split`, after checking that they belong to these shards (and this
    teacher / proposer when their fingerprints are given) and that the file is whole."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    where = folder / MANIFEST
    entry = manifest["splits"].get(split)
    if not isinstance(entry, dict):
        raise SignalsError(f"{where}: no split '{split}' (stored: {', '.join(manifest['splits']) or 'none'})")
    expected = shards_fingerprint(shards_dir, split)
    if entry.get("shards_fingerprint") != expected:
        raise SignalsError(f"{where}: split '{split}' was scored on other shards than {shards_dir} "
                           f"(fingerprint {entry.get('shards_fingerprint')} vs {expected}); score it again")
    for role, fingerprint in (("teacher", teacher_fingerprint), ("proposer", proposer_fingerprint)):
        stored = manifest.get(role, {})
        if fingerprint is not None and stored.get("fingerprint") != fingerprint:
            raise SignalsError(f"{where}: scored with another {role} ({stored.get('spec')}, fingerprint "
                               f"{stored.get('fingerprint')} vs {fingerprint}); score it again")
    table = folder / entry.get("file", f"{split}.pt")
    if not table.is_file() or table.stat().st_size != entry.get("bytes") or file_digest(table) != entry.get("blake2b"):
        raise SignalsError(f"{table}: missing, truncated or changed since {where} was written; score it again")
    try:
        tensors = torch.load(table, map_location="cpu", weights_only=True)
        signals = StoredSignals(**{k: tensors[k].long() if k in _ROW_KEYS else tensors[k] for k in TABLE_KEYS})
    except Exception as err:  # noqa: BLE001 - any unreadable table is one line naming it
        raise SignalsError(f"{table}: unreadable teacher signals ({type(err).__name__})") from None
    return signals, manifest


def check_covers(signals: StoredSignals, directions, candidates: int, folder) -> None:
    """The table holds at least `candidates` candidates for each direction a run distils (a pass
    made with --directions i2t holds none for t2i)."""
    for direction in directions:
        stored = signals.candidates(direction)
        if stored == 0:
            raise SignalsError(f"{folder}: no {direction} candidates stored (the pass ran without "
                               f"--directions {direction}); score with --directions {','.join(directions)} "
                               f"or train without {direction}")
        if stored < candidates:
            raise SignalsError(f"{folder}: {stored} {direction} candidates stored, --candidates {candidates} "
                               f"asked; score with --candidates {candidates}")
