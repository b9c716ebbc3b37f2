"""Issue 18, a user's own data start to finish: make_shards carves val/test out of a one-split source
(by key, the same images every time), a folder without a val split validates on a held-out slice of
train that training never sees (or not at all with --eval-every 0), and run.py checks everything
before its process group starts whatever launched it. The slow test runs it all under the
`deepspeed` launcher on 2 ranks: train.log, the ETA, TensorBoard's hparams, projector and the
picture of what the teacher ranked, and the export at the end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import free_port, make_photo_folder, make_synthetic_shards, run_env, two_rank_command
from tools import make_shards

REPO = Path(__file__).resolve().parent.parent


def keys_of(shards: Path, split: str) -> list:
    from train.data import iterate_eval
    return [k for batch in iterate_eval(str(shards), split, 64, 32) for k in batch["keys"]]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("own"), count=40)


def carve(photos, out: Path, val: int, test: int) -> Path:
    images, table = photos
    assert make_shards.main(["--source", "csv", "--input", str(table), "--images", str(images), "--out", str(out),
                             "--val-images", str(val), "--test-images", str(test), "--maxcount", "8",
                             "--quiet"]) == 0
    return out


def test_make_shards_carves_val_and_test_by_key(photos, tmp_path):
    first = carve(photos, tmp_path / "a", val=4, test=3)
    train, val, test = (keys_of(first, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (33, 4, 3)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    again = carve(photos, tmp_path / "b", val=4, test=5)
    assert keys_of(again, "val") == val  # the same images, whatever else is asked
    assert set(test) < set(keys_of(again, "test"))
    vocabulary = json.loads((first / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "disc" in vocabulary  # trained on the train split's captions


def test_carving_errors_are_one_line(photos, tmp_path, capsys):
    images, table = photos
    base = ["--source", "csv", "--input", str(table), "--images", str(images), "--quiet"]
    assert make_shards.main(base + ["--out", str(tmp_path / "x"), "--val-images", "40"]) == 2
    assert make_shards.main(base + ["--out", str(tmp_path / "y"), "--split", "val", "--val-images", "4"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "too few to carve" in errors[0] and "own 'val' split" in errors[1]


def test_a_folder_without_val_holds_out_a_slice_of_train(tmp_path):
    from train.config import parse_config
    from train.data import make_train_loader
    from train.validation_source import validation_source
    shards = make_synthetic_shards(tmp_path / "s", train=96, val=8, maxcount=16, image_size=32)
    (shards / "val.json").unlink()
    cfg = parse_config(["--shards", str(shards), "--stage", "student", "--eval-images", "50"])
    source = validation_source(cfg)
    assert (source.split, source.images, source.held_out) == ("train", 9, 9) and "no split 'val'" in source.note
    held = set(keys_of(shards, "train")[:9])
    loader = make_train_loader(str(shards), "train", batch_size=8, image_size=32, num_workers=0,
                               held_out=source.held_out)
    seen = set()
    for _, batch in zip(range(30), loader):  # 240 samples: every one of the 87 left, more than twice
        seen |= {f"{i:09d}" for i in batch["image_ids"].tolist()}
    assert len(seen) == 87 and not seen & held
    off = validation_source(parse_config(["--shards", str(shards), "--eval-every", "0"]))
    assert off.split is None and off.held_out == 0


# ------------------------------------------------------------------------------------------ launched

def launched(command: list, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_checks_run_before_the_process_group_under_every_launcher(tmp_path):
    """A missing shard folder: one line, exit 2, under the deepspeed launcher and torchrun alike."""
    args = ["train/run.py", "--stage", "student", "--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), *args]
    for command in (two_rank_command(args[1:]), torchrun):
        result = launched(command, timeout=200)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
        assert errors == [f"error: shard folder not found: {tmp_path / 'nowhere'}"], result.stderr[-2000:]
        assert result.returncode != 0 and "train/run.py\", line" not in result.stderr  # none of ours
        # (torchrun adds a report of its own, ChildFailedError with its traceback, on any failure)


@pytest.mark.slow
def test_one_split_photos_distill_on_two_ranks_watch_and_export(tmp_path):
    images, table = make_photo_folder(tmp_path, count=80)  # 8 held out: a tenth
    shards = tmp_path / "shards"
    assert make_shards.main(["--source", "csv", "--input", str(table), "--images", str(images), "--out",
                             str(shards), "--maxcount", "20", "--quiet"]) == 0
    out = tmp_path / "run"
    common = ["--shards", str(shards), "--batch-size", "4", "--image-size", "32", "--log-every", "2",
              "--save-every", "4", "--teacher", "film-tiny", "--num-workers", "1"]
    result = launched(two_rank_command(["--out", str(out), "--steps", "4", "--eval-every", "2", *common]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "no split 'val': validating on the first 8 images of 'train', held out of training" in log
    assert "step 4/4" in log and ", ETA 0s" in log and ", elapsed " in log and "done: exported" in log
    assert (out / "student" / "model.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("val/teacher_ranking")] == [2, 4]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))
    projector = (out / "tb" / "projector_config.pbtxt").read_text()
    assert "val_gallery" in projector and "sprite" in projector
    metadata = next((out / "tb").glob("*/val_gallery/metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "kind\tcaption" and len(metadata) == 1 + 2 * 8

    quiet = tmp_path / "no_eval"  # one rank without a launcher: the same code path, half the start-up
    result = subprocess.run([sys.executable, "train/run.py", "--out", str(quiet), "--steps", "2", "--eval-every", "0",
                             *common], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=run_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=str(free_port())))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (quiet / "student" / "model.safetensors").is_file() and "[dcd] val " not in (quiet / "train.log").read_text()
