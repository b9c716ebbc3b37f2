"""Scaling out: every ds config trains, the multi-node command line, Accelerate, the real-data recipes.

What runs for real here (2 CPU ranks, 3 steps, tiny shards):
- `deepspeed --num_gpus 2 train/run.py --ds ds_configs/zero3_offload.json` (the reference run);
- ZeRO-3 across a 2-node layout: the per-node commands DeepSpeed's runner builds for a 2-host
  hostfile, each node's command started here as its own process tree (node_rank 0 and 1);
- `accelerate launch --config_file configs/accelerate_cpu_2proc.yaml train/run.py` with ZeRO-2.
(ZeRO-2 under `deepspeed --num_gpus 2` is tests/test_train_e2e.py's student run.) With the same seed
all of them must reproduce the reference's loss curve: same data split by global rank, same pool.

What cannot run here (one machine, no ssh, no pdsh): the launch on real remote hosts. Checked instead
by building the runner's command for a 2-host hostfile with Popen replaced, and by running
DeepSpeed's per-node launcher with Popen replaced to read the rank layout it gives each process.
"""
import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import free_port, make_synthetic_shards, two_rank_command, zero_to_fp32_matches_export
from tests.fixtures import run_env as fixtures_run_env

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEPS = 3


def run_env(**extra):
    return fixtures_run_env(PYTHONPATH=str(REPO), **extra)


def train_args(shards, out):
    return ["--stage", "student", "--shards", str(shards), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "8", "--log-every", "1", "--eval-every", str(STEPS), "--save-every",
            str(STEPS), "--eval-images", "16", "--num-workers", "1"]


def losses(out: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def check_export(out: Path, shards: Path):
    """The exported student loads without the trainer and is whole (ZeRO-3 export gathers)."""
    from train.models.presets import build_student
    from train.models.student import DualEncoder
    student = DualEncoder.from_pretrained(out / "student")
    fresh = build_student("student-tiny", tokenizer_dir=shards / "tokenizer")
    exported = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    assert exported == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    assert all(0 not in shape for shape in exported.values())
    assert student.encode_text(**student.tokenize(["a red circle"])).shape[0] == 1


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shards") / "synthetic", train=64, val=16,
                                 test=0, maxcount=32, tokenizer=True, image_size=32)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """ZeRO-3 with optimizer and parameters offloaded to CPU, under the deepspeed launcher."""
    out = tmp_path_factory.mktemp("zero3_offload")
    command = two_rank_command(["--ds", "ds_configs/zero3_offload.json", *train_args(shards, out)])
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=300)
    return out, ok(result)


# ----------------------------------------------------------------------------- ds configs

@pytest.mark.slow
def test_zero3_offload_trains_and_exports_a_whole_student(reference, shards):
    out, output = reference
    assert "2 rank(s) x batch 8, ZeRO-3" in output
    assert len(losses(out)) == STEPS
    check_export(out, shards)


@pytest.mark.slow
def test_zero_to_fp32_gives_the_exported_student_from_a_zero3_offload_checkpoint(reference, tmp_path):
    """The README's command, the zero_to_fp32.py DeepSpeed saved beside the checkpoints, on ZeRO-3
    partitions (here with the optimizer and parameters offloaded) gives the exported weights."""
    out, _ = reference
    assert zero_to_fp32_matches_export(out, "student", tmp_path) > 0


def test_teacher_inference_config_is_derived_from_each_ds_config():
    from train.engine import read_ds_config, teacher_ds_config
    for name in ("zero2", "zero3", "zero3_offload", "zero2_bf16"):
        student = read_ds_config(REPO / "ds_configs" / f"{name}.json", world_size=2, micro_batch=8)
        teacher = teacher_ds_config(student, 3)
        assert teacher["zero_optimization"]["stage"] == 3, name
        assert "optimizer" not in teacher and "gradient_clipping" not in teacher, name
        assert teacher["train_batch_size"] == 16, name
        for precision in ("bf16", "torch_autocast"):  # the teacher computes in the student's precision
            assert teacher.get(precision) == student.get(precision), name
        offload = student["zero_optimization"].get("offload_param")
        assert teacher["zero_optimization"].get("offload_param") == offload, name
        assert "offload_optimizer" not in teacher["zero_optimization"], name
    assert teacher["torch_autocast"]["dtype"] == "bfloat16"  # the last one read: zero2_bf16
    assert teacher_ds_config(student, 0)["zero_optimization"] == {"stage": 0}


# ----------------------------------------------------------------------------- multi-node

def run_runner(argv):
    """deepspeed.launcher.runner.main with Popen and ssh replaced: returns (cmd, env) it would run.

    runner.subprocess is the subprocess module itself: the patches are undone before returning.
    """
    from deepspeed.launcher import multinode_runner, runner
    calls = []

    class FakePopen:
        returncode = 0

        def __init__(self, cmd, env=None, **kwargs):
            calls.append((cmd, env))

        def wait(self):
            return 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.subprocess, "Popen", FakePopen)
        mp.setattr(runner.subprocess, "check_call", lambda *a, **k: 0)  # the ssh check
        mp.setattr(multinode_runner.PDSHRunner, "backend_exists", lambda self: True)
        mp.setattr(runner.signal, "signal", lambda *a: None)
        runner.main(argv)
    assert len(calls) == 1
    return calls[0]


def node_command(cmd: list, node_rank: int) -> list:
    """What pdsh runs on one node: the part after `cd REPO;`, with %n replaced by the node rank."""
    start = next(i for i, part in enumerate(cmd) if part.startswith("cd "))
    return [part.replace("%n", str(node_rank)) for part in cmd[start + 1:]]


def test_multinode_command_line(monkeypatch, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# host slots=N\nworker-1 slots=2\nworker-2 slots=2\n")
    user_args = ["--stage", "distill", "--ds", "ds_configs/zero2.json", "--out", "runs/two nodes"]
    monkeypatch.chdir(REPO)
    cmd, env = run_runner(["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "2",
                           "--master_addr", "10.0.0.1", "--master_port", "29611", "train/run.py",
                           *user_args])
    assert cmd[:2] == ["pdsh", "-S"] and cmd[cmd.index("-w") + 1] == "worker-1,worker-2"
    assert f"cd {REPO};" in cmd
    world_info = next(p for p in cmd if p.startswith("--world_info="))
    layout = json.loads(base64.urlsafe_b64decode(world_info.split("=", 1)[1]))
    assert layout == {"worker-1": [0, 1], "worker-2": [0, 1]}
    assert {"--node_rank=%n", "--master_addr=10.0.0.1", "--master_port=29611"} <= set(cmd)
    script = cmd.index("train/run.py")
    # pdsh joins the words into one shell line, so the runner quotes the argument with a space
    assert cmd[script + 1:] == [*user_args[:-1], '"runs/two nodes"']
    assert env["PDSH_RCMD_TYPE"] == "ssh"
    exports = cmd[cmd.index("-w") + 2]
    assert f"export PYTHONPATH={REPO}" in exports  # the repo is importable on every node

    # What the per-node launcher gives each process on the second node: global ranks 2 and 3.
    from deepspeed.launcher import launch
    spawned = []

    class FakeProcess:
        pid, returncode = 4242, 0

        def __init__(self, command, env=None, **kwargs):
            spawned.append((command, dict(env)))

        def poll(self):
            return 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch.subprocess, "Popen", FakeProcess)
        mp.setattr(launch.signal, "signal", lambda *a: None)
        mp.setattr(launch.time, "sleep", lambda s: None)
        mp.setattr(sys, "argv", ["launch", *node_command(cmd, 1)[4:]])
        launch.main()
    layout = [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"])
              for _, e in spawned]
    assert layout == [("2", "0", "4", "10.0.0.1", "29611"), ("3", "1", "4", "10.0.0.1", "29611")]
    assert spawned[1][0][2:5] == ["train/run.py", "--local_rank=1", "--stage"]


def test_train_run_splits_data_by_global_rank():
    """The loader's rank is the process group's (global) rank, never LOCAL_RANK."""
    source = (REPO / "train" / "comm.py").read_text()
    assert "return dist.get_rank(), dist.get_world_size()" in source
    run = (REPO / "train" / "run.py").read_text()
    assert "rank, world = comm.init()" in run
    assert "rank=rank, world_size=world" in run


@pytest.mark.slow
def test_two_node_layout_trains_like_one_node(reference, shards, monkeypatch, tmp_path):
    """The runner's per-node commands for 2 hosts x 1 slot, both nodes started on this machine.

    LOCAL_RANK is 0 on both nodes; only the global rank tells them apart. Same seed and data as the
    reference, so the loss curve must be the reference's if the data is split by global rank.
    """
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    cmd, _ = run_runner(["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "1",
                         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                         "train/run.py", "--ds", "ds_configs/zero3.json", *train_args(shards, out)])
    nodes = [subprocess.Popen(node_command(cmd, rank), cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        finally:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outputs[1]
    assert "2 rank(s) x batch 8, ZeRO-3" in outputs[0]
    assert losses(out) == pytest.approx(losses(reference[0]), rel=1e-4)
    check_export(out, shards)
    # ds_configs/zero3.json, ranks on two "nodes": DeepSpeed's library call rebuilds the export
    assert zero_to_fp32_matches_export(out, "student", tmp_path, script=False) > 0


def test_launch_sh_forwards_multinode_options(shards, tmp_path):
    """./launch.sh hands --hostfile / --num_nodes / --master_addr to the deepspeed launcher."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "deepspeed"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    result = subprocess.run(
        ["./launch.sh", "--hostfile", "hosts", "--num-nodes", "2", "--master_addr", "10.0.0.1",
         "--no_ssh_check", "--ranks", "4", "--stage", "student", "--steps", "3", "--shards", str(shards)],
        cwd=REPO, env=run_env(DEEPSPEED=str(fake)), capture_output=True, text=True, timeout=120)
    ok(result)
    argv = json.loads(record.read_text())
    script = argv.index("train/run.py")
    launcher, user = argv[:script], argv[script + 1:]
    assert launcher[:2] == ["--num_gpus", "4"]  # CPU: --ranks processes per node
    assert {("--hostfile", "hosts"), ("--num_nodes", "2"), ("--master_addr", "10.0.0.1")} <= set(
        zip(launcher, launcher[1:]))
    assert "--no_ssh_check" in launcher
    assert user == ["--stage", "student", "--steps", "3", "--shards", str(shards)]


# ----------------------------------------------------------------------------- accelerate

@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(reference, shards, tmp_path):
    config = REPO / "configs" / "accelerate_cpu_2proc.yaml"
    accelerate = str(BIN / "accelerate")
    # Each process writes its rank variables to its own file: stdout of two processes through the
    # launcher's pipes is no record (a CI run once saw none of the probe's lines there).
    probe = tmp_path / "probe.py"
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    probe.write_text("import json, os, uuid\n"
                     "env = {k: os.environ.get(k) for k in "
                     "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}\n"
                     f"open(os.path.join({str(seen_dir)!r}, uuid.uuid4().hex + '.json'), 'w').write(json.dumps(env))\n")
    output = ok(subprocess.run([accelerate, "launch", "--config_file", str(config), str(probe)], cwd=REPO,
                               env=run_env(), capture_output=True, text=True, timeout=120))
    seen = sorted((json.loads(f.read_text()) for f in seen_dir.iterdir()), key=lambda e: str(e["RANK"]))
    assert len(seen) == 2, f"accelerate launch started {len(seen)} probe process(es):\n{output[-3000:]}"
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in seen] == [("0", "0", "2"), ("1", "1", "2")]
    assert all(e["MASTER_ADDR"] and e["MASTER_PORT"] for e in seen)

    out = tmp_path / "run"
    output = ok(subprocess.run([accelerate, "launch", "--config_file", str(config), "train/run.py",
                                "--ds", "ds_configs/zero2.json", *train_args(shards, out)], cwd=REPO,
                               env=run_env(), capture_output=True, text=True, timeout=300))
    assert "2 rank(s) x batch 8, ZeRO-2" in output
    assert losses(out) == pytest.approx(losses(reference[0]), rel=1e-4)
    check_export(out, shards)


# ----------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("name, teacher", [("flickr30k_vilt", "dandelin/vilt-b32-finetuned-flickr30k"),
                                           ("coco_vilt", "dandelin/vilt-b32-finetuned-coco")])
def test_real_data_recipe_resolves(name, teacher):
    from train.config import parse_config
    from train.engine import read_ds_config
    path = REPO / "configs" / f"{name}.json"
    cfg = parse_config(["--config", str(path)], world_size=8)
    t, d = cfg.train, cfg.distill
    assert cfg.model.teacher == teacher and cfg.model.student == "from-teacher"
    assert t.stage == "distill" and cfg.data.image_size == 384
    assert (d.hard_negatives, d.alpha, t.weight_decay, t.schedule) == (7, 0.2, 0.01, "linear")
    assert t.warmup_steps == t.steps // 10
    ds = read_ds_config(REPO / t.ds, world_size=8, micro_batch=t.batch_size)
    # bf16 by autocast (fp32 weights and inputs; the loader's pixels stay float32): see docs/real_data.md
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["zero_optimization"]["stage"] == 2 and not ds.get("bf16", {}).get("enabled")
    assert ds["train_batch_size"] == 8 * t.batch_size
    # flags still win over the file
    assert parse_config(["--config", str(path), "--steps", "10"]).train.steps == 10
