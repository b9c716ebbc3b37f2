"""Issue 7, provoked for real: bad data, bad configuration, faults during training, clean exits.

Fast tests (in-process): corrupt samples in training and evaluation streams, a slot with nothing
readable, preflight's one-line errors, run.py's one-line spec error, launch.sh stopping before any
rank starts and binding TensorBoard to loopback. A crash in the middle of a checkpoint save and a
pickled object in a checkpoint run against a real 1-rank DeepSpeed engine in a subprocess.
Slow tests (launches): a 2-rank run on corrupt shards stopped by SIGTERM twice (the `deepspeed`
command alone, then the whole process group) and resumed to the end; 1-rank runs for determinism
and for non-finite losses (--lr 1e30) stopping after --max-bad-steps.
"""
from __future__ import annotations

import io
import json
import tarfile
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures import (CORRUPT_JPEG, NOT_AN_IMAGE, free_port, image_bytes, make_synthetic_shards,
                            run_env, two_rank_command, write_raw_shard)

REPO = Path(__file__).resolve().parent.parent

# reasons train/data.py counts, and how many of each one bad shard from bad_samples() holds
EXPECTED_PER_BAD_SHARD = {"bad_image": 2, "bad_json": 3, "empty_caption": 2, "bad_text": 1,
                          "bad_image_size": 3, "missing_image": 1}


# ------------------------------------------------------------------------------------------ helpers

def one_rank_env() -> dict:
    """What a launcher sets for rank 0 of 1, so `python train/run.py` needs no launcher."""
    return run_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))


def scalars(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


_HUGE = {}


def huge_jpeg() -> bytes:
    """10,000 x 10,000 pixels (100 MP, over samples.MAX_PIXELS): ~1 MB encoded, made once."""
    if "jpeg" not in _HUGE:
        _HUGE["jpeg"] = _encoded(Image.new("L", (10_000, 10_000), 128), "JPEG")
    return _HUGE["jpeg"]


def bad_samples(prefix: str, first_id: int) -> list:
    """(key, members): every kind of corrupt sample (EXPECTED_PER_BAD_SHARD), plus readable odd
    ones (CMYK, 16-bit, palette, RGBA, 1000 x 700 px) that must not be skipped."""
    ids = iter(range(first_id, first_id + 100))

    def meta(captions=("a red circle on the left",)):
        return json.dumps({"image_id": next(ids), "captions": list(captions), "twin_id": None,
                           "group": None}).encode()

    good = image_bytes(size=(32, 32), seed=first_id)
    bad = {
        "corrupt_jpeg": {"jpg": CORRUPT_JPEG, "json": meta()},                       # bad_image
        "not_an_image": {"jpg": NOT_AN_IMAGE, "json": meta()},                       # bad_image
        "no_json": {"jpg": good, "txt": b"a caption without json"},                  # bad_json
        "nothing_but_image": {"jpg": good},                                          # bad_json
        "broken_json": {"jpg": good, "json": b'{"image_id": 1, "capt'},              # bad_json
        "no_caption": {"jpg": good, "json": meta(captions=())},                      # empty_caption
        "blank_caption": {"jpg": good, "json": meta(captions=("  ",)), "txt": b" "},  # empty_caption
        "latin1_caption": {"jpg": good, "json": meta(captions=()), "txt": "caf\xe9 \xff".encode("latin-1")},
        "one_pixel": {"png": _encoded(Image.new("RGB", (1, 1)), "PNG"), "json": meta()},  # bad_image_size
        "ten_thousand_px": {"jpg": huge_jpeg(), "json": meta()},                     # bad_image_size
        "sliver": {"png": _encoded(Image.new("L", (10_000, 300)), "PNG"), "json": meta()},  # bad_image_size
        "no_image": {"json": meta(), "txt": b"a caption of nothing"},                # missing_image
    }
    odd_but_fine = {
        "cmyk": {"jpg": image_bytes("CMYK", size=(32, 32), seed=1), "json": meta()},
        "sixteen_bit": {"png": image_bytes("I;16", size=(32, 32), fmt="PNG", seed=2), "json": meta()},
        "palette": {"png": image_bytes("P", size=(32, 32), fmt="PNG", seed=3), "json": meta()},
        "rgba": {"png": image_bytes("RGBA", size=(40, 24), fmt="PNG", seed=4), "json": meta()},
        "large": {"jpg": image_bytes(size=(1000, 700), seed=5), "json": meta()},
    }
    samples = [(f"{prefix}_{name}", files) for name, files in {**bad, **odd_but_fine}.items()]
    assert sum(EXPECTED_PER_BAD_SHARD.values()) == len(bad)
    return samples


def add_bad_shards(shards: Path, split: str, names: list, first: bool = False, truncate: int | None = None):
    """Add one bad shard per name to a split's manifest (first or last); truncate shard `truncate`
    of the split to 60% of its bytes (a damaged tar)."""
    from train.samples import read_shard
    manifest_path = shards / f"{split}.json"
    manifest = json.loads(manifest_path.read_text())
    for i, name in enumerate(names):
        write_raw_shard(shards / name, bad_samples(name.split(".")[0].replace("-", "_"), 10_000 * (i + 1)))
    if truncate is not None:
        victim = shards / manifest["shards"][truncate]
        data = victim.read_bytes()
        # Cut inside a member's data, not at a 512-byte header boundary: a tar that ends exactly
        # between members reads as a shorter, intact tar (whether 60% lands there depends on the
        # sizes of the images, which changed with the data generator).
        with tarfile.open(victim) as tar:
            members = [m for m in tar.getmembers() if m.size > 2]
        member = min(members, key=lambda m: abs(m.offset_data - len(data) * 6 // 10))
        victim.write_bytes(data[: member.offset_data + member.size // 2])
    manifest["shards"] = names + manifest["shards"] if first else manifest["shards"] + names
    manifest["shard_counts"] = [sum(1 for _ in read_shard(shards / s)) for s in manifest["shards"]]
    manifest_path.write_text(json.dumps(manifest))


def make_bad_shards(root: Path, train: int = 64, maxcount: int = 16) -> Path:
    """Synthetic shards with corrupt samples in both training and validation splits."""
    shards = make_synthetic_shards(root / "shards", train=train, val=16, maxcount=maxcount,
                                   tokenizer=True, image_size=32)
    add_bad_shards(shards, "train", ["train-bad0.tar", "train-bad1.tar"], truncate=0)
    add_bad_shards(shards, "val", ["val-bad0.tar"], first=True)
    return shards


class Reader:
    """Collects a process's merged output in a thread; waits for text or for EOF (every writer
    gone: the launcher and every rank)."""

    def __init__(self, proc):
        self.lines, self.proc = [], proc
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if needle in self.text:
                return True
            if not self.thread.is_alive():
                return needle in self.text
            time.sleep(0.3)
        return False

    def wait_eof(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def start_two_ranks(args: list) -> tuple:
    proc = subprocess.Popen(two_rank_command(args), cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, Reader(proc)


def kill_session(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------ bad data

def test_corrupt_samples_are_skipped_and_counted_in_training_and_evaluation(tmp_path, caplog):
    from train.data import DataError, iterate_eval, make_train_loader
    shards = make_bad_shards(tmp_path)
    loader = make_train_loader(shards, "train", batch_size=8, image_size=32, num_workers=0, seed=1)
    batches = iter(loader)
    for _ in range(12):  # more than one pass over the readable samples
        batch = next(batches)
        assert batch["pixels"].shape == (8, 3, 32, 32) and "skipped" not in batch
    for reason, n in EXPECTED_PER_BAD_SHARD.items():
        assert loader.skipped[reason] >= 2 * n, (reason, dict(loader.skipped))  # two bad shards
    assert loader.skipped["damaged_shard"] >= 1, dict(loader.skipped)

    skipped = Counter()
    with caplog.at_level(logging.WARNING, logger="train.data"):
        images = sum(len(b["keys"]) for b in iterate_eval(shards, "val", 8, 32, skipped=skipped))
    assert skipped == Counter(EXPECTED_PER_BAD_SHARD)
    assert images == 16 + 5  # the good split and the odd but readable images
    summary = [r.getMessage() for r in caplog.records if "corrupt samples" in r.getMessage()]
    assert summary and "bad_image 2" in summary[0] and "missing_image 1" in summary[0], summary

    # a split where nothing is readable: an error, not an endless wait for a first batch
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    readable = ("cmyk", "sixteen_bit", "palette", "rgba", "large")
    bad = [s for s in bad_samples("x", 1) if s[0].split("_", 1)[1] not in readable]
    write_raw_shard(only_bad / "allbad-0.tar", bad)
    (only_bad / "allbad.json").write_text(json.dumps({"split": "allbad", "shards": ["allbad-0.tar"]}))
    with pytest.raises(DataError, match="no readable sample"):
        next(iter(make_train_loader(only_bad, "allbad", batch_size=4, image_size=32, num_workers=0)))


# ------------------------------------------------------------------------------------------ bad configuration

@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("clean") / "shards", train=32, val=8, maxcount=8,
                                 tokenizer=True, image_size=32)


def preflight(capsys, *argv) -> tuple:
    from train import preflight as pf
    code = pf.main(list(argv))
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith(("error:", "warning:"))]


def test_preflight_bad_ds_configs_one_line_naming_file_and_field(tmp_path, clean_shards, capsys):
    not_json = tmp_path / "not_json.json"
    not_json.write_text('{"train_micro_batch_size_per_gpu": 8,,}')
    stage9 = tmp_path / "stage9.json"
    stage9.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 9}}))
    indivisible = tmp_path / "indivisible.json"
    indivisible.write_text(json.dumps({"train_batch_size": 10, "zero_optimization": {"stage": 2}}))
    mismatch = tmp_path / "mismatch.json"
    mismatch.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8}))
    cases = [(not_json, [], "not valid JSON"), (stage9, [], "'zero_optimization.stage' is 9"),
             (indivisible, [], "'train_batch_size' (10) is not divisible"),
             (mismatch, ["--batch-size", "8"], "'train_batch_size' (32) != micro batch")]
    for path, extra, expected in cases:
        code, lines = preflight(capsys, "--ranks", "3", "--stage", "student", "--shards", str(clean_shards),
                                "--ds", str(path), *extra)
        assert code == 2 and len(lines) == 1, (path, lines)
        assert lines[0].startswith(f"error: {path}: ") and expected in lines[0], lines
    code, lines = preflight(capsys, "--ranks", "2", "--stage", "student", "--shards", str(clean_shards),
                            "--ds", "ds_configs/zero2.json", "--batch-size", "8")
    assert code == 0 and lines == []


def test_preflight_bad_specs_data_and_resume(tmp_path, clean_shards, capsys):
    base = ["--ranks", "2", "--shards", str(clean_shards), "--batch-size", "8"]
    empty_folder = tmp_path / "no_config"
    empty_folder.mkdir()
    cases = [
        (["--stage", "student", "--student", "student-huge"], "error: unknown student spec 'student-huge'"),
        (["--stage", "student", "--student", str(empty_folder)], "without config.json"),
        (["--stage", "student", "--student", "some-org/some-model"], "as a hub id"),
        (["--stage", "teacher", "--teacher", "film-giant"], "error: unknown teacher spec 'film-giant'"),
        (["--stage", "teacher", "--teacher", "meter-huge"], "unknown METER preset"),
        (["--stage", "distill", "--teacher", str(tmp_path / "missing")], "unknown teacher spec"),
        (["--stage", "distill", "--teacher", "film-tiny", "--student", "from-teacher"], "without unimodal towers"),
        (["--stage", "student", "--not-a-flag", "1"], "error: command line: unrecognized arguments"),
        (["--stage", "student", "--resume", "latest", "--out", str(tmp_path / "run")], "no complete checkpoint"),
    ]
    for argv, expected in cases:
        code, lines = preflight(capsys, *base, *argv)
        assert code == 2 and len(lines) == 1 and expected in lines[0], (argv, lines)

    missing_shard = tmp_path / "missing_shard"
    make_synthetic_shards(missing_shard, train=16, val=8, maxcount=8, image_size=32)
    (missing_shard / "train-00001.tar").unlink()
    tiny_no_val = tmp_path / "no_val"
    make_synthetic_shards(tiny_no_val, train=16, val=8, maxcount=8, image_size=32)
    (tiny_no_val / "val.json").unlink()
    for shards, expected in [(tmp_path / "nowhere", "shard folder not found"),
                             (missing_shard, "shard listed in"), (tiny_no_val, "too small to hold 8 out")]:
        code, lines = preflight(capsys, "--ranks", "2", "--stage", "student", "--shards", str(shards))
        assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    # no val split: validation on a held-out slice of train (one warning line), or none at all
    no_val = tmp_path / "no_val_big"
    make_synthetic_shards(no_val, train=96, val=8, maxcount=48, image_size=32, tokenizer=True)
    (no_val / "val.json").unlink()
    code, lines = preflight(capsys, "--ranks", "1", "--stage", "student", "--shards", str(no_val))
    assert code == 0 and len(lines) == 1 and "no split 'val': validating on the first 9 images" in lines[0]
    code, lines = preflight(capsys, "--ranks", "1", "--stage", "student", "--shards", str(no_val),
                            "--eval-every", "0")
    assert code == 0 and lines == []

    # 4 shards for 2 ranks x 4 workers: works, split by sample, and says so in one line
    code, lines = preflight(capsys, *base, "--stage", "student", "--num-workers", "4")
    assert code == 0 and len(lines) == 1 and lines[0].startswith("warning: ") and "by sample" in lines[0]


def test_run_py_spec_error_is_one_line(clean_shards, tmp_path):
    """run.py itself (no preflight): an unknown --student ends in one line and exit 2."""
    result = subprocess.run(
        [sys.executable, "train/run.py", "--stage", "student", "--shards", str(clean_shards), "--out",
         str(tmp_path / "run"), "--student", "student-huge", "--batch-size", "8"],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown student spec 'student-huge'")


def test_launch_sh_stops_before_any_rank_and_binds_tensorboard_to_loopback(tmp_path, clean_shards):
    import psutil
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 5}, "train_micro_batch_size_per_gpu": 8}')
    port = free_port()
    result = subprocess.run(
        ["bash", "launch.sh", "--tensorboard", "--tensorboard-port", str(port), "--stage", "student",
         "--shards", str(clean_shards), "--out", str(tmp_path / "run"), "--ds", str(bad)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    tb_pid = int(output.split("(pid ", 1)[1].split(")", 1)[0]) if "(pid " in output else None
    try:
        assert result.returncode == 2, output[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {bad}: field 'zero_optimization.stage' is 5; use one of (0, 1, 2, 3)"]
        assert "launch.py" not in output and "spawned" not in output  # no rank was started
        assert not (tmp_path / "run").exists()
        assert tb_pid is not None, output
        listening = []
        deadline = time.time() + 60
        while time.time() < deadline and not listening:
            listening = [c.laddr for c in psutil.Process(tb_pid).net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
            time.sleep(0.5)
        assert listening and all(addr.ip == "127.0.0.1" and addr.port == port for addr in listening), listening
    finally:
        if tb_pid is not None and psutil.pid_exists(tb_pid):
            os.kill(tb_pid, signal.SIGTERM)


def test_launch_sh_hands_signal_flags_to_the_pipeline_and_refuses_them_for_one_stage(tmp_path):
    """--signals / --signal-costs belong to the pipeline (tools/pipeline.py), whose own checks answer;
    with a stage's flags they are one line, before anything runs."""
    costs = tmp_path / "costs.json"
    costs.write_text('{"stages": {}}')
    result = subprocess.run(["bash", "launch.sh", "--run", "signal_check", "--signals", "stored",
                             "--signal-costs", str(costs)], cwd=REPO, env=run_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"pipeline: --signal-costs {costs}: no number at scoring.seconds (the train.json of "
        "tools/benchmark.py train with --teacher and --teacher-signals)")
    assert not (REPO / "runs" / "signal_check").exists()  # checked before the pipeline made anything
    result = subprocess.run(["bash", "launch.sh", "--signals", "stored", "--stage", "student"], cwd=REPO,
                            env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: --signals is the pipeline's; one stage reads "
                                                      "stored signals with --teacher-signals PATH")


# ------------------------------------------------------------------------------------------ checkpoints

CHECKPOINT_SCRIPT = r'''
import json, os, sys, pickle
from pathlib import Path
import torch
from train import comm
from train import engine as E
from train.config import ConfigError

out = Path(sys.argv[1])
ds = E.read_ds_config("ds_configs/zero2.json", 1, 4)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
engine = E.build_student_engine(model, ds, 1e-2, 0.0, 1, 10, "cosine")

def train_step():
    loss = engine(torch.randn(4, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()

def weights():
    return [p.detach().clone() for p in engine.module.parameters()]

ckpt = out / "checkpoints"
train_step()
E.save_checkpoint(engine, ckpt, 1, client_state={"step": 1, "data_batches": 1})
at_step1, lr_step1 = weights(), engine.get_lr()[0]
train_step()

# crash part-way through the save of step 2: the first file is written, the second raises
from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce
original, calls = tce.TorchCheckpointEngine.save, []
def failing_save(self, state_dict, path):
    calls.append(path)
    if len(calls) == 2:
        raise OSError(28, "No space left on device (provoked)")
    return original(self, state_dict, path)
tce.TorchCheckpointEngine.save = failing_save
try:
    E.save_checkpoint(engine, ckpt, 2, client_state={"step": 2, "data_batches": 2})
    crashed = False
except OSError:
    crashed = True
tce.TorchCheckpointEngine.save = original
result = {"crashed": crashed, "files_before_crash": len(calls) - 1,
          "partial_step2": sorted(p.name for p in (ckpt / "step2").iterdir()) if (ckpt / "step2").exists() else [],
          "latest_after_crash": (ckpt / "latest").read_text().strip(), "latest_tag": E.latest_tag(ckpt)}

# --resume latest: what run.py does (engine.load_checkpoint(engine, ckpt, "latest"))
state = E.load_checkpoint(engine, ckpt, "latest")
result["resumed_state"] = state
result["resumed_weights_equal_step1"] = all(torch.equal(a, b) for a, b in zip(weights(), at_step1))
result["resumed_lr_equal_step1"] = engine.get_lr()[0] == lr_step1

# saving step 2 again replaces the partial folder; saving it once more leaves it untouched
train_step()
E.save_checkpoint(engine, ckpt, 2, client_state={"step": 2, "data_batches": 2})
model_file = next((ckpt / "step2").glob("mp_rank_*_model_states.pt"))
stamp = model_file.stat().st_mtime_ns
E.save_checkpoint(engine, ckpt, 2, client_state={"step": 2, "data_batches": 99})
result["latest_after_resave"] = E.latest_tag(ckpt)
result["same_step_not_rewritten"] = model_file.stat().st_mtime_ns == stamp
result["step2_loads"] = E.load_checkpoint(engine, ckpt, "latest")

# a checkpoint file carrying a pickled object that runs code when unpickled
marker = out / "code_ran"
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))
evil = torch.load(model_file, map_location="cpu", weights_only=False)
evil["extra"] = Payload()
torch.save(evil, model_file)
try:
    E.load_checkpoint(engine, ckpt, "latest")
    result["refused"] = None
except Exception as err:
    result["refused"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
result["code_ran_under_weights_only"] = marker.exists()
torch.load(model_file, map_location="cpu", weights_only=False)  # proof the payload is live
result["code_runs_when_unpickled"] = marker.exists()
print("RESULT " + json.dumps(result), flush=True)
comm.shutdown()  # gloo aborts at exit now and then without it (docs/platform_notes.md)
'''


def test_crash_during_checkpoint_save_and_pickled_payload(tmp_path):
    """A real 1-rank DeepSpeed engine (ZeRO-2): the save of step 2 fails after its first file;
    `latest` still names step 1, which loads (weights, LR schedule, client state). A checkpoint file
    with a pickled code-running object is refused by the weights-only loader."""
    result = subprocess.run([sys.executable, "-c", CHECKPOINT_SCRIPT, str(tmp_path)], cwd=REPO,
                            env=one_rank_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout + result.stderr)[-3000:]
    r = json.loads(lines[0][len("RESULT "):])
    assert r["crashed"] and r["files_before_crash"] == 1 and r["partial_step2"], r
    assert r["latest_after_crash"] == "step1" and r["latest_tag"] == "step1", r
    assert r["resumed_state"]["step"] == 1 and r["resumed_state"]["data_batches"] == 1, r
    assert r["resumed_weights_equal_step1"] and r["resumed_lr_equal_step1"], r
    assert r["latest_after_resave"] == "step2" and r["same_step_not_rewritten"], r
    assert r["step2_loads"]["data_batches"] == 2, r
    assert r["refused"] and "UnpicklingError" in r["refused"], r
    assert not r["code_ran_under_weights_only"] and r["code_runs_when_unpickled"], r


# ------------------------------------------------------------------------------------------ launches

@pytest.mark.slow
def test_bad_data_run_survives_sigterm_twice_and_resumes_to_the_end(tmp_path):
    """2 ranks on shards with corrupt samples in train and val.
    1. SIGTERM to the `deepspeed` command alone (as a scheduler cancelling the job's process): it
       dies at once; the ranks see their launcher gone, save, and exit 0.
    2. --resume latest, then SIGTERM to the whole process group: the ranks save and exit 0.
    3. --resume latest to the end: exit 0; the loss curve has every step once; skips counted."""
    shards = make_bad_shards(tmp_path, train=128, maxcount=32)
    out = tmp_path / "run"
    args = ["--stage", "student", "--shards", str(shards), "--out", str(out), "--steps", "400",
            "--batch-size", "8", "--log-every", "1", "--eval-every", "4", "--save-every", "1000",
            "--eval-images", "40", "--num-workers", "1", "--lr", "3e-3"]
    latest = out / "checkpoints" / "latest"

    proc, reader = start_two_ranks(args)
    try:
        assert reader.wait_for("step 5/400", 240), reader.text[-3000:]
        proc.send_signal(signal.SIGTERM)  # the launcher process only
        assert proc.wait(30) == -signal.SIGTERM
        assert reader.wait_eof(120), "ranks still running after their launcher died"
    finally:
        kill_session(proc)
    first = reader.text
    assert "stop requested (launcher gone): checkpoint saved at step" in first, first[-3000:]
    assert first.count("exits successfully") == 2 and "Traceback" not in first, first[-3000:]
    stopped_at = int(latest.read_text().strip()[4:])
    assert stopped_at >= 5 and f"checkpoint saved at step {stopped_at};" in first

    proc, reader = start_two_ranks([*args, "--resume", "latest"])
    try:
        assert reader.wait_for(f"step {stopped_at + 3}/400", 240), reader.text[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as SLURM does
        assert reader.wait_eof(120), "ranks still running after SIGTERM"
        proc.wait(30)
    finally:
        kill_session(proc)
    second = reader.text
    assert f"resumed from {out / 'checkpoints'} at step {stopped_at}" in second
    assert "stop requested (SIGTERM): checkpoint saved at step" in second, second[-3000:]
    # launch.py's own SIGTERM handler waits for the ranks and exits 1 without reporting them: what
    # shows they stopped cleanly is the saved step, no traceback, and run 3 resuming from it
    assert "Traceback" not in second and "killed by signal" not in second, second[-3000:]
    stopped_again = int(latest.read_text().strip()[4:])
    assert stopped_again >= stopped_at + 3

    final = stopped_again + 3
    proc, reader = start_two_ranks([*args, "--resume", "latest", "--steps", str(final)])
    try:
        assert proc.wait(300) == 0, reader.text[-3000:]
        reader.wait_eof(30)
    finally:
        kill_session(proc)
    third = reader.text
    assert f"resumed from {out / 'checkpoints'} at step {stopped_again}" in third
    assert "[dcd] done: exported student" in third
    assert (out / "student" / "model.safetensors").is_file()

    tb = scalars(out / "tb")
    steps = [s for s, _ in tb["train/loss"]]
    assert sorted(steps) == list(range(1, final + 1)), steps  # every step once, across three runs
    assert tb["data/skipped"][-1][1] > 0 and tb["data/skipped_bad_image_size"][-1][1] > 0, tb["data/skipped"]
    assert {f"data/skipped_{r}" for r in EXPECTED_PER_BAD_SHARD} <= set(tb), sorted(tb)
    assert "val/rsum" in tb
    logged = [line for line in (first + second + third).splitlines()
              if line.startswith("[dcd] step") and "; skipped " in line]
    assert logged, "no skip counts in the log"
    for reason in [*EXPECTED_PER_BAD_SHARD, "damaged_shard"]:  # each reason named, with its count
        assert any(f" {reason} " in line or f"({reason} " in line for line in logged), reason
    assert "eval val: skipped 12 corrupt samples" in third


@pytest.mark.slow
def test_one_rank_determinism_and_non_finite_loss_stop(tmp_path, clean_shards):
    """Three 1-rank runs at once: two identical (same seed, same data: identical losses), and one
    with --lr 1e30, whose loss turns non-finite after the first update: those steps are skipped and
    counted, and after --max-bad-steps in a row the run saves and exits 3."""
    def start(out, *extra):
        command = [sys.executable, "train/run.py", "--stage", "student", "--shards", str(clean_shards),
                   "--out", str(out), "--batch-size", "8", "--log-every", "1", "--eval-every", "1000",
                   "--save-every", "1000", "--num-workers", "1", "--seed", "7", *extra]
        return subprocess.Popen(command, cwd=REPO, env=one_rank_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    runs = {"a": start(tmp_path / "a", "--steps", "4"), "b": start(tmp_path / "b", "--steps", "4"),
            "nan": start(tmp_path / "nan", "--steps", "50", "--lr", "1e30", "--max-bad-steps", "3")}
    outputs = {}
    try:
        for name, proc in runs.items():
            outputs[name] = proc.communicate(timeout=300)[0]
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
    assert runs["a"].returncode == 0 and runs["b"].returncode == 0, outputs["a"][-2000:] + outputs["b"][-2000:]
    loss_a = scalars(tmp_path / "a" / "tb")["train/loss"]
    loss_b = scalars(tmp_path / "b" / "tb")["train/loss"]
    assert len(loss_a) == 4 and loss_a == loss_b, (loss_a, loss_b)
    log_a = [line for line in outputs["a"].splitlines() if line.startswith("[dcd] step")]
    log_b = [line for line in outputs["b"].splitlines() if line.startswith("[dcd] step")]
    assert [line.split(" samples/s")[0].rsplit(" ", 1)[0] for line in log_a] == \
           [line.split(" samples/s")[0].rsplit(" ", 1)[0] for line in log_b]

    nan = outputs["nan"]
    assert runs["nan"].returncode == 3, nan[-3000:]
    assert nan.count("non-finite loss, step skipped") == 3, nan[-3000:]
    assert "stopping: 3 non-finite losses in a row (--max-bad-steps 3); checkpoint saved at step 1" in nan
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip() == "step1"
    skipped = scalars(tmp_path / "nan" / "tb")["train/skipped_steps"]
    assert skipped[-1][1] == 3, skipped
