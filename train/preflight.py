"""Check a training command before the launcher spawns any rank.

    python -m train.preflight --ranks N <the same flags as train/run.py>

train/run.py runs these checks itself on every rank before its process group starts (whatever
launched it: deepspeed, torchrun, accelerate, launch.sh), so that a bad flag, DeepSpeed config,
shard folder or model spec is one line on the terminal (from the first rank to fail) instead of N
tracebacks from N ranks; launch.sh also runs this command first, so that a bad run starts no
launcher at all. It loads no model weights and starts no process group: the config is parsed (train.config.parse_config with world_size=N), the DeepSpeed
config read (engine.read_ds_config: not JSON, unknown ZeRO stage, a batch that does not divide), the
split manifests and the shards they list checked (train.data.load_manifest), the --teacher /
--student specs parsed by train/models/presets.py's parse_spec (the grammar the builders use; a hub
id's config is fetched, never weights), their tokenizers found, and --resume matched to a checkpoint.

Exit 2 and `error: <one line>` on stderr at the first problem; `warning: <one line>` for what works
but deserves a look (a split with fewer shards than ranks x loader workers); exit 0 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
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
    from train.validation_source import validation_source
    d = cfg.data
    warnings = []
    train = load_manifest(d.shards, d.train_split)
    source = validation_source(cfg)  # the loop validates every --eval-every steps
    if source.split == d.val_split:
        load_manifest(d.shards, d.val_split)
    elif source.note:
        warnings.append(source.note)
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

def _needs_tokenizer(cfg: RunConfig, what: str, spec: str) -> None:
    if tokenizer_folder(cfg) is None:
        raise ConfigError(f"{what} {spec!r} is a preset built on the data tokenizer, and "
                          f"{Path(cfg.data.shards) / 'tokenizer'} holds none (tools/make_shards.py writes it)")


def _parse(spec: str, role: str):
    """train/models/presets.py's parse_spec (the one grammar the builders use), errors as ConfigError."""
    from train.models.presets import hub_model_type, parse_spec
    try:
        parsed = parse_spec(spec, role)
        if parsed.form == "hub":
            hub_model_type(parsed)
    except ValueError as err:
        raise ConfigError(_first_line(err)) from None
    return parsed


def _check_pretrained_tokenizer(cfg: RunConfig, parsed) -> None:
    """A transformers folder reads with its own tokenizer or --tokenizer FOLDER, never the shards'."""
    from train.models.common import has_tokenizer_files
    override = cfg.model.tokenizer
    if override is not None:
        if not has_tokenizer_files(override):
            raise ConfigError(f"--tokenizer {override}: no tokenizer files there (tokenizer.json, "
                              f"vocab.txt, spiece.model, ...)")
    elif parsed.form == "hf-folder" and not has_tokenizer_files(parsed.path):
        raise ConfigError(f"--{parsed.role} {parsed.text} has no tokenizer files (tokenizer.json, "
                          f"vocab.txt, spiece.model, ...): give --tokenizer FOLDER")


def check_teacher(cfg: RunConfig, spec: str) -> str:
    """The teacher's backend ('film', 'vilt', 'meter', ...) read from its spec; ConfigError if the
    spec names nothing train/models/presets.py can build."""
    from train.models.presets import TEACHER_PRESETS, meter_tokenizer_dir
    what = "--teacher"
    if cfg.train.stage == "distill" and spec == DEFAULT_TEACHER and not Path(spec).exists():
        raise ConfigError(missing_default_teacher())  # the run's own message
    parsed = _parse(spec, "teacher")
    _check_pretrained_tokenizer(cfg, parsed)
    if parsed.form == "preset":
        _needs_tokenizer(cfg, what, spec)
        return TEACHER_PRESETS[spec]["backend"]
    if parsed.form in ("meter", "meter-checkpoint"):
        try:
            meter_tokenizer_dir(parsed, None, cfg.model.tokenizer)
        except ValueError as err:
            raise ConfigError(_first_line(err)) from None
        if parsed.name == "meter-tiny" and cfg.model.tokenizer is None:
            _needs_tokenizer(cfg, what, spec)
        return "meter"
    if parsed.form == "project-folder":
        return parsed.kind
    return {"scene-oracle": "scene-oracle"}.get(parsed.form, "vilt")


def check_student(cfg: RunConfig, spec: str, teacher_backend: str | None) -> str:
    """The student spec's form ('preset', 'from-teacher', 'project-folder', 'hf-folder', 'hub');
    ConfigError if it names nothing."""
    what = "--student"
    parsed = _parse(spec, "student")
    _check_pretrained_tokenizer(cfg, parsed)
    if parsed.form == "preset" and cfg.train.stage != "distill" and cfg.model.tokenizer is None:
        _needs_tokenizer(cfg, what, spec)
    if parsed.form == "from-teacher":
        if cfg.train.stage != "distill":
            raise ConfigError(f"{what} from-teacher needs the distill stage (a teacher to copy towers from)")
        if teacher_backend not in ("vilt", "meter"):
            raise ConfigError(f"{what} from-teacher: teacher {cfg.model.teacher!r} is a {teacher_backend!r} "
                              f"model without unimodal towers; use student-tiny or an HF dual encoder")
    return parsed.form


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
    return check_run(parse_run_flags(argv, ranks), ranks)


def check_run(cfg: RunConfig, ranks: int) -> list:
    """The checks after the flags parsed (train/run.py runs them itself, on every rank, before its
    process group starts); returns warnings, raises on the first error."""
    from train.engine import read_ds_config
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
    parser.add_argument("--no-warnings", action="store_true",
                        help="errors only (launch.sh: train/run.py prints the warnings itself)")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.ranks < 1:
            raise ConfigError(f"--ranks must be at least 1, got {args.ranks}")
        warnings = preflight(rest, args.ranks)
    except (ConfigError, DataError) as err:
        print(f"error: {_first_line(err)}", file=sys.stderr, flush=True)
        return 2
    for line in [] if args.no_warnings else warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
