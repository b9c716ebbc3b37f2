"""Stored teacher signals: the file's checks, the clustered batches, and (slow) the scoring pass under
the deepspeed launcher, killed and resumed, then training from it on 2 ranks."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.fixtures import DEEPSPEED, free_port, make_synthetic_shards, run_env, two_rank_command
from train.clustered import ClusteredBatches, EmbeddedCandidateBatches, compose_global_batch
from train.distill.stored import StoredSignals, table_from_scores
from train.eval_split import EvalSplit
from train.signals import SignalsError, check_covers, load_split, shards_fingerprint, write_split

REPO = Path(__file__).resolve().parent.parent
TEACHER = {"spec": "t", "fingerprint": "teacher-fp"}
PROPOSER = {"spec": "p", "fingerprint": "proposer-fp"}


def random_table(images=12, captions_per_image=2, M=4, seed=0) -> StoredSignals:
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.arange(images).repeat_interleave(captions_per_image)
    C = caption_image.numel()
    i2t = torch.stack([torch.randperm(C, generator=g)[:M + captions_per_image] for _ in range(images)])
    i2t = torch.stack([row[caption_image[row] != i][:M] for i, row in enumerate(i2t)])
    t2i = torch.stack([torch.tensor([j for j in torch.randperm(images, generator=g).tolist()
                                     if j != int(caption_image[c])][:M]) for c in range(C)])
    scores = torch.randn(i2t.numel() + t2i.numel() + C, generator=g)
    return table_from_scores(torch.arange(images) + 50, caption_image, i2t, t2i, scores)


@pytest.fixture
def stored(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train.json").write_text(json.dumps({"split": "train", "fingerprint": "abc"}))
    table = random_table()
    write_split(tmp_path / "signals", "train", table, TEACHER, PROPOSER,
                {"shards_fingerprint": shards_fingerprint(shards, "train"), "candidates": 4})
    return tmp_path / "signals", shards, table


def test_signals_round_trip_and_fingerprint_checks(stored):
    folder, shards, table = stored
    loaded, manifest = load_split(folder, "train", shards, "teacher-fp", "proposer-fp")
    for key, value in table._asdict().items():
        assert torch.equal(getattr(loaded, key), value), key
    assert manifest["splits"]["train"]["bytes"] == (folder / "train.pt").stat().st_size
    for args, says in ((("val", shards), "no split 'val'"),
                       (("train", shards, "other"), "another teacher"),
                       (("train", shards, None, "other"), "another proposer")):
        with pytest.raises(SignalsError, match=says) as err:
            load_split(folder, *args)
        assert "manifest.json" in str(err.value) and "\n" not in str(err.value)
    (shards / "train.json").write_text(json.dumps({"split": "train", "fingerprint": "regenerated"}))
    with pytest.raises(SignalsError, match="other shards"):
        load_split(folder, "train", shards)


def test_truncated_or_missing_files_are_one_line_naming_them(stored):
    folder, shards, _ = stored
    table = folder / "train.pt"
    table.write_bytes(table.read_bytes()[:100])
    with pytest.raises(SignalsError, match="truncated") as err:
        load_split(folder, "train", shards)
    assert str(table) in str(err.value)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(SignalsError, match="not valid JSON"):
        load_split(folder, "train", shards)
    with pytest.raises(SignalsError, match="not found"):
        load_split(folder.parent / "nowhere", "train", shards)


def test_clustered_batch_holds_queries_and_their_top_candidates():
    table = random_table(images=40, captions_per_image=2, M=4)
    g = torch.Generator().manual_seed(0)
    rows = compose_global_batch(table, seeds=[3, 7, 11, 19], world=2, batch_size=6, queries=2, g=g)
    assert len(rows) == 12
    images = [r[0] for r in rows]
    assert len(set(images)) == 12  # every image once
    assert [rows[0][0], rows[1][0], rows[6][0], rows[7][0]] == [3, 7, 11, 19]  # seeds first on each rank
    assert all(int(table.caption_image[c]) == i for i, c in rows)
    # each seed's i2t candidate the teacher scores highest is in the batch with that very caption
    captions = {c for _, c in rows}
    for seed in (3, 7, 11, 19):
        best = int(table.i2t_index[seed, table.i2t_score[seed].argmax()])
        assert best in captions or int(table.caption_image[best]) in images


def test_clustered_batch_fills_only_from_the_candidates_the_objective_reads():
    """An i2t-only run reading the first 2 candidates: every fill row is one of those (the seeds'
    t2i candidates and later i2t ones would take rows from candidates the loss uses)."""
    table = random_table(images=60, captions_per_image=2, M=4, seed=1)
    seeds, taken = [], set()  # seeds whose first 2 candidates are 2 images no other seed uses
    for image in range(60):
        candidate_images = set(table.caption_image[table.i2t_index[image, :2]].tolist())
        if len(seeds) < 4 and len(candidate_images) == 2 and not (candidate_images | {image}) & taken:
            seeds.append(image)
            taken |= candidate_images | {image}
    rows = compose_global_batch(table, seeds=seeds, world=2, batch_size=6, queries=2,
                                g=torch.Generator().manual_seed(0), directions=("i2t",), candidates=2)
    read = {(int(table.caption_image[c]), c) for s in seeds for c in table.i2t_index[s, :2].tolist()}
    fills = [r for r in rows if r[0] not in seeds]
    assert len(fills) == 8 and set(fills) <= read  # 4 seeds x 2 candidates fill the 8 free rows exactly
    # with one free row per seed, each seed's first fill is the candidate its teacher scores highest
    rows = compose_global_batch(table, seeds=seeds, world=2, batch_size=4, queries=2,
                                g=torch.Generator().manual_seed(0), directions=("i2t",), candidates=2)
    best = {int(table.i2t_index[s, table.i2t_score[s, :2].argmax()]) for s in seeds}
    assert {c for i, c in rows if i not in seeds} == best


def test_an_i2t_only_table_round_trips_and_refuses_t2i_runs(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train.json").write_text(json.dumps({"split": "train", "fingerprint": "abc"}))
    full = random_table(M=3)
    table = full._replace(t2i_index=full.t2i_index[:, :0], t2i_score=full.t2i_score[:, :0])
    write_split(tmp_path / "signals", "train", table, TEACHER, PROPOSER,
                {"shards_fingerprint": shards_fingerprint(shards, "train"), "candidates": 3,
                 "directions": ["i2t"]})
    loaded, _ = load_split(tmp_path / "signals", "train", shards)
    assert loaded.candidates("i2t") == 3 and loaded.candidates("t2i") == 0
    check_covers(loaded, ("i2t",), 3, "sig")
    with pytest.raises(SignalsError, match="no t2i candidates stored") as err:
        check_covers(loaded, ("i2t", "t2i"), 3, "sig")
    assert str(err.value).startswith("sig:") and "\n" not in str(err.value)
    with pytest.raises(SignalsError, match="3 i2t candidates stored, --candidates 4"):
        check_covers(loaded, ("i2t",), 4, "sig")


def test_an_i2t_only_pass_proposes_the_same_captions_and_scores_a_fifth_of_the_pairs():
    """tools/score_teacher.py --directions i2t: the same top-M captions per image as the full pass,
    no images per caption, so 1 + M pairs per image (M per image and M + 1 per caption in full)."""
    from tools.score_teacher import propose
    from train.distill.stored import signal_pairs
    from train.models.presets import build_student
    torch.manual_seed(0)
    proposer = build_student("student-tiny", tokenizer_dir=REPO / "assets/teacher-film/tokenizer").eval()
    g = torch.Generator().manual_seed(0)
    split = EvalSplit(pixels=torch.randint(0, 256, (10, 3, 32, 32), generator=g, dtype=torch.uint8),
                      captions=[f"a red cube number {c}" for c in range(50)],
                      caption_image_index=torch.arange(10).repeat_interleave(5), image_ids=torch.arange(10),
                      twin_index=torch.full((10,), -1), keys=[str(i) for i in range(10)])
    full_i2t, full_t2i = propose(proposer, split, 3, rank=0, world=1)
    i2t, t2i = propose(proposer, split, 3, rank=0, world=1, directions=("i2t",))
    assert torch.equal(i2t, full_i2t) and full_t2i.shape == (50, 3) and t2i.shape == (50, 0)
    images, captions = signal_pairs(i2t, t2i, split.caption_image_index)
    assert images.numel() == 10 * 3 + 50 and torch.equal(captions[30:], torch.arange(50))


def test_clustered_batches_are_rank_slices_of_one_global_batch_and_resume_exactly():
    table = random_table(images=40, captions_per_image=2, M=4)
    split = EvalSplit(pixels=torch.arange(40).view(40, 1, 1, 1).expand(40, 3, 2, 2).to(torch.uint8),
                      captions=[f"caption {c}" for c in range(80)], caption_image_index=table.caption_image,
                      image_ids=table.image_ids, twin_index=torch.full((40,), -1), keys=[str(i) for i in range(40)])

    def tokenizer(captions, **_):
        ids = torch.tensor([[int(c.split()[1]) + 1] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loader(rank, start_batch=0):
        return ClusteredBatches(split, table, 6, 2, rank, 2, 0, start_batch, tokenizer, 4)

    first = [next(iter(loader(r))) for r in (0, 1)]
    assert not set(first[0]["image_ids"].tolist()) & set(first[1]["image_ids"].tolist())
    assert torch.equal(first[0]["pixels"][:, 0, 0, 0].long() + 50, first[0]["image_ids"])
    assert torch.equal(first[0]["input_ids"][:, 0] - 1, first[0]["caption_rows"])
    resumed, fresh = next(iter(loader(1, start_batch=3))), loader(1).batch(3)
    assert torch.equal(resumed["caption_rows"], fresh["caption_rows"])


def test_embedded_candidate_batches_are_random_keep_twins_and_carry_the_kept_candidates():
    table = random_table(images=40, captions_per_image=2, M=4)
    twin = torch.tensor([i + 1 if i % 2 == 0 else i - 1 for i in range(40)])  # scenes 0/1, 2/3, ... are twins
    split = EvalSplit(pixels=torch.arange(40).view(40, 1, 1, 1).expand(40, 3, 2, 2).to(torch.uint8),
                      captions=[f"caption {c}" for c in range(80)], caption_image_index=table.caption_image,
                      image_ids=table.image_ids, twin_index=twin, keys=[str(i) for i in range(40)])

    def tokenizer(captions, **_):
        ids = torch.tensor([[int(c.split()[1]) + 1] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loader(rank, start_batch=0):
        return EmbeddedCandidateBatches(split, table, 6, 2, rank, 2, 0, start_batch, tokenizer, 4, ("i2t",), 3,
                                        hard_negatives=2)

    batches = [loader(r).batch(1) for r in (0, 1)]
    rows = torch.cat([b["image_ids"] for b in batches]) - 50
    assert rows.unique().numel() == 12 and set(rows.tolist()) == {r ^ 1 for r in rows.tolist()}  # twins together
    for b in batches:
        queries = (b["image_ids"][:2] - 50).tolist()
        first3 = table.i2t_index[queries, :3]
        kept = first3.gather(1, table.i2t_score[queries, :3].topk(2, dim=1).indices)
        assert set(b["candidate_caption_rows"].tolist()) == set(kept.flatten().tolist())
        assert torch.equal(b["candidate_input_ids"][:, 0] - 1, b["candidate_caption_rows"])
        assert b["candidate_image_rows"].numel() == 0 and b["candidate_pixels"].shape[0] == 0
    assert torch.equal(next(iter(loader(1, start_batch=1)))["caption_rows"], batches[1]["caption_rows"])


# ---------------------------------------------------------------------------------------------------
# Slow: the real pass under the launcher, killed and resumed; training from it; wrong signals.

def score_command(shards, out, *extra):
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "tools/score_teacher.py",
            "--ds", "ds_configs/zero3.json", "--shards", str(shards), "--split", "train", "--teacher",
            "film-tiny", "--proposer", "student-tiny", "--candidates", "4", "--out", str(out),
            "--pairs-per-chunk", "600", "--no-progress", *extra]


@pytest.mark.slow
def test_scoring_pass_resumes_and_training_reads_it(tmp_path):
    shards = make_synthetic_shards(tmp_path / "shards", train=64, val=16, tokenizer=True)
    out = tmp_path / "signals"
    killed = subprocess.run(score_command(shards, out), cwd=REPO, env=run_env(DCD_FAULT="teacher#3"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    assert len(list(out.glob(".partial-train-*/chunk-*.pt"))) == 2 and not (out / "manifest.json").exists()
    done = subprocess.run(score_command(shards, out), cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    entry = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert entry["images"] == 64 and entry["pairs"] == 64 * 4 + 320 * 4 + 320 and entry["pairs_per_s"] > 0
    assert not list(out.glob(".partial-*"))
    check_scores_against_the_teacher(shards, out)
    train = ["--ds", "ds_configs/zero2.json", "--stage", "distill", "--shards", str(shards), "--teacher-signals",
             str(out), "--steps", "2", "--batch-size", "8", "--distill-queries", "2", "--eval-images", "8",
             "--candidates", "4", "--hard-negatives", "2",
             "--out", str(tmp_path / "run")]
    ran = subprocess.run(two_rank_command(train), cwd=REPO, env=run_env(), capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (tmp_path / "run" / "student").is_dir()
    (out / "train.pt").write_bytes((out / "train.pt").read_bytes()[:-10])
    bad = subprocess.run(two_rank_command(train), cwd=REPO, env=run_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "truncated" in bad.stdout + bad.stderr
    assert "[dcd] stage distill" not in bad.stdout  # nothing trained


def check_scores_against_the_teacher(shards, out):
    """The stored positives' scores are the teacher's own (1 rank, no ZeRO, in this process)."""
    from train.eval_split import read_eval_split
    from train.evaluation import teacher_pair_scores
    from train.models.presets import build_teacher
    torch.manual_seed(0)
    teacher = build_teacher("film-tiny", tokenizer_dir=shards / "tokenizer")
    split = read_eval_split(shards, "train")
    table, _ = load_split(out, "train", shards)
    expected = teacher_pair_scores(teacher, split, split.caption_image_index, torch.arange(split.num_captions),
                                   rank=0, world_size=1)
    assert torch.allclose(table.positive_score, expected, atol=1e-4)
