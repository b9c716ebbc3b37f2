"""Check a training command before the launcher spawns any rank.

    python -m train.preflight --ranks N <the same flags as train/run.py>

launch.sh runs this first, so that a bad flag, DeepSpeed config, shard folder or model spec is one
line on the terminal instead of N tracebacks from N ranks. It loads no model weights and starts no
process group: the config is parsed (train.config.parse_config with world_size=N), the DeepSpeed
config read (engine.read_ds_config: not JSON, unknown ZeRO stage, a batch that does not divide), the
split manifests and the shards they list checked (train.data.load_manifest), the --teacher /
--student specs resolved the way train/models/presets.py would (a preset, a folder with a
config.json, or a hub id, only when it looks like one), and --resume matched to a checkpoint.

Exit 2 and `error: <one line>` on stderr at the first problem; `warning: <one line>` for what works
but deserves a look (a split with fewer shards than ranks x loader workers); exit 0 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

from train.config import DEFAULT_TEACHER, ConfigError, RunConfig, missing_default_teacher, parse_config
from train.data import DataError


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def parse_run_flags(argv: list, ranks: int) -> RunConfig:
    """parse_config, with argparse's usage-and-error (two lines and SystemExit) made one ConfigError."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_config(argv, world_size=ranks)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help went to stdout
            raise
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        message = lines[-1] if lines else "bad command line"
        raise ConfigError("command line: " + message.split("error: ", 1)[-1]) from None


# ---------------------------------------------------------------------------------------- data

def check_data(cfg: RunConfig, ranks: int) -> list:
    """Manifests and shards of the training and validation splits; returns warning lines."""
    from train.data import load_manifest
    d = cfg.data
    warnings = []
    train = load_manifest(d.shards, d.train_split)
    load_manifest(d.shards, d.val_split)  # the loop validates every --eval-every steps
    workers = max(1, d.num_workers)
    slots = ranks * workers
    if len(train["paths"]) < slots:
        warnings.append(
            f"split '{d.train_split}' of {d.shards} has {len(train['paths'])} shard(s) for {ranks} rank(s) "
            f"x {workers} loader worker(s) = {slots} slots: the loader splits it by sample (every slot "
            f"reads every shard); write more shards (tools/make_shards.py --maxcount) to read less")
    return warnings


def tokenizer_folder(cfg: RunConfig) -> Path | None:
    folder = Path(cfg.data.shards) / "tokenizer"
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        return folder
    return None


# ---------------------------------------------------------------------------------------- models

def _read_model_config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{what} {folder}: a folder without config.json (not a saved model)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {folder}: config.json is not valid JSON ({_first_line(err)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{what} {folder}: config.json is not a JSON object")
    return config


def _hub_model_type(spec: str, what: str) -> str | None:
    """model_type of a hub id from its config alone (no weights); offline it fails in one line."""
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(spec).model_type
    except Exception as err:
        raise ConfigError(f"{what} {spec!r}: not a preset or an existing folder, and as a hub id: "
                          f"{_first_line(err)}") from None


def _needs_tokenizer(cfg: RunConfig, what: str, spec: str) -> None:
    if tokenizer_folder(cfg) is None:
        raise ConfigError(f"{what} {spec!r} is a preset built on the data tokenizer, and "
                          f"{Path(cfg.data.shards) / 'tokenizer'} holds none (tools/make_shards.py writes it)")


def check_teacher(cfg: RunConfig, spec: str) -> str:
    """The teacher's backend ('film', 'vilt', 'meter', ...) read from its spec; ConfigError if the
    spec names nothing train/models/presets.py can build."""
    from train.models.presets import TEACHER_PRESETS, _looks_like_hub_id
    what = "--teacher"
    if cfg.train.stage == "distill" and spec == DEFAULT_TEACHER and not Path(spec).exists():
        raise ConfigError(missing_default_teacher())  # the run's own message
    if spec in TEACHER_PRESETS:
        _needs_tokenizer(cfg, what, spec)
        return TEACHER_PRESETS[spec]["backend"]
    if spec.startswith("meter-") or spec.endswith(".ckpt"):
        from train.models.meter import PRESETS as METER_PRESETS
        preset, _, checkpoint = spec.partition(":")
        if spec.endswith(".ckpt") and not checkpoint:
            preset, checkpoint = "meter-clip16-roberta", spec
        if preset not in METER_PRESETS:
            raise ConfigError(f"{what} {spec!r}: unknown METER preset {preset!r} "
                              f"(presets: {', '.join(sorted(METER_PRESETS))})")
        if checkpoint and not Path(checkpoint).is_file():
            raise ConfigError(f"{what} {spec!r}: checkpoint {checkpoint} not found")
        if preset == "meter-tiny":
            _needs_tokenizer(cfg, what, spec)
        return "meter"
    path = Path(spec)
    if path.is_dir():
        config = _read_model_config(path, what)
        if "backend" in config:
            if not (path / "model.safetensors").is_file():
                raise ConfigError(f"{what} {spec}: no model.safetensors beside its config.json")
            return str(config["backend"])
        if config.get("model_type") == "vilt":
            return "vilt"
        raise ConfigError(f"{what} {spec}: holds neither a saved teacher nor a ViLT model "
                          f"(model_type {config.get('model_type')!r})")
    if path.exists():
        raise ConfigError(f"{what} {spec}: a file, not a model folder or preset")
    if _looks_like_hub_id(spec):
        model_type = _hub_model_type(spec, what)
        if model_type != "vilt":
            raise ConfigError(f"{what} hub id {spec!r} is a {model_type!r} model, not ViLT")
        return "vilt"
    raise ConfigError(f"unknown teacher spec {spec!r}: not a preset ({', '.join(TEACHER_PRESETS)}, "
                      f"meter-*), an existing folder or a hub id")


def check_student(cfg: RunConfig, spec: str, teacher_backend: str | None) -> str:
    """What the student spec is ('preset', 'from-teacher', 'folder', 'hub'); ConfigError if nothing."""
    from train.models.presets import STUDENT_PRESETS, _looks_like_hub_id
    what = "--student"
    if spec in STUDENT_PRESETS:
        if cfg.train.stage != "distill":
            _needs_tokenizer(cfg, what, spec)
        return "preset"
    if spec == "from-teacher":
        if cfg.train.stage != "distill":
            raise ConfigError(f"{what} from-teacher needs the distill stage (a teacher to copy towers from)")
        if teacher_backend not in ("vilt", "meter"):
            raise ConfigError(f"{what} from-teacher: teacher {cfg.model.teacher!r} is a {teacher_backend!r} "
                              f"model without unimodal towers; use student-tiny or an HF dual encoder")
        return "from-teacher"
    path = Path(spec)
    if path.is_dir():
        config = _read_model_config(path, what)
        if config.get("backend") == "dual_encoder":
            if not (path / "model.safetensors").is_file():
                raise ConfigError(f"{what} {spec}: no model.safetensors beside its config.json")
            return "folder"
        if config.get("model_type") in ("clip", "vision-text-dual-encoder"):
            return "folder"
        raise ConfigError(f"{what} {spec}: holds neither a saved student nor a CLIP / "
                          f"VisionTextDualEncoder model")
    if path.exists():
        raise ConfigError(f"{what} {spec}: a file, not a model folder or preset")
    if _looks_like_hub_id(spec):
        model_type = _hub_model_type(spec, what)
        if model_type not in ("clip", "vision-text-dual-encoder"):
            raise ConfigError(f"{what} hub id {spec!r} is a {model_type!r} model, not CLIP or "
                              f"VisionTextDualEncoder")
        return "hub"
    raise ConfigError(f"unknown student spec {spec!r}: not a preset ({', '.join(STUDENT_PRESETS)}, "
                      f"from-teacher), an existing folder or a hub id")


# ---------------------------------------------------------------------------------------- resume

def check_resume(cfg: RunConfig) -> None:
    from train.engine import LATEST, latest_tag
    tag = cfg.train.resume
    if not tag:
        return
    ckpt_dir = Path(cfg.train.out) / "checkpoints"
    if tag == LATEST:
        if latest_tag(ckpt_dir) is None:
            raise ConfigError(f"--resume latest: no complete checkpoint in {ckpt_dir} "
                              f"(no '{LATEST}' pointer naming an existing folder)")
    elif not (ckpt_dir / tag).is_dir():
        raise ConfigError(f"--resume {tag}: {ckpt_dir / tag} not found")


# ---------------------------------------------------------------------------------------- main

def preflight(argv: list, ranks: int) -> list:
    """Every check, in the order a run would meet them; returns warnings, raises on the first error."""
    from train.engine import read_ds_config
    cfg = parse_run_flags(argv, ranks)
    read_ds_config(cfg.train.ds, ranks, cfg.train.batch_size)
    warnings = check_data(cfg, ranks)
    stage = cfg.train.stage
    teacher_backend = None
    if stage == "teacher" or (stage == "distill" and not cfg.distill.teacher_signals):  # else the manifest names it
        teacher_backend = check_teacher(cfg, str(cfg.model.teacher))
    if stage in ("student", "distill"):
        check_student(cfg, str(cfg.model.student), teacher_backend)
    check_resume(cfg)
    return warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.preflight", allow_abbrev=False,
        description="Check train/run.py's flags, DeepSpeed config, shards and model specs before "
                    "launching; all other flags are train/run.py's own.")
    parser.add_argument("--ranks", type=int, default=1, help="ranks the launcher will start")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.ranks < 1:
            raise ConfigError(f"--ranks must be at least 1, got {args.ranks}")
        warnings = preflight(rest, args.ranks)
    except (ConfigError, DataError) as err:
        print(f"error: {_first_line(err)}", file=sys.stderr, flush=True)
        return 2
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
