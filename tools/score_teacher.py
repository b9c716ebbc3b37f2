"""Score once, distil many times: the teacher's scores of a proposer's hard candidates, stored beside
the shards for `train/run.py --stage distill --teacher-signals PATH`.

    deepspeed --num_gpus 2 tools/score_teacher.py --ds ds_configs/zero3.json --shards shards/synthetic \\
        --split train --teacher runs/default/teacher/teacher --proposer runs/default/baseline/student \\
        --candidates 16 --out shards/synthetic/signals

1. The proposer (a dual encoder, e.g. the contrastive baseline) embeds every image and caption of
   the split once (each rank a block); for every image its top-M captions of the WHOLE split, for
   every caption its top-M images (exact: chunked matrix product + topk, own image's pairs excluded).
   `--directions i2t` proposes (and scores) captions for images only: the runs that distil image->text
   only (tools/recipes.py) read nothing else, and the pass scores 1 + M pairs per image instead of
   about 6M + 5.
2. The teacher, a ZeRO-3 inference engine across the ranks as in distillation, scores those pairs
   and every positive, in chunks of pairs split across the ranks. Rank 0 keeps each finished chunk
   in `PATH/.partial-{split}-{key}/` (key: teacher, proposer, shards, M), so a killed pass started
   again with the same flags resumes at the first missing chunk.
3. The table and the manifest (fingerprints, M, counts, seconds, pairs/s) are written atomically
   (train/signals.py); the last line printed is the split's manifest entry as JSON.
Exit status 2 with one line for a bad flag, spec, shard folder or ds config.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from train import comm, failure
from train import engine as ds_engine
from train.config import ConfigError, parse_directions
from train.distill.stored import exact_top_candidates, signal_pairs, table_from_scores
from train.eval_split import read_eval_split
from train.evaluation import (block_of_rank, embed_images, embed_texts, model_fingerprint,
                              teacher_pair_scores)
from train.models.presets import build_student, build_teacher
from train.signals import shards_fingerprint, write_split

PAIRS_PER_CHUNK = 65_536  # a resume point every ~10-30 s of teacher work on a CPU rank


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ds", default="ds_configs/zero3.json", help="DeepSpeed config (micro batch, precision)")
    p.add_argument("--shards", required=True, help="folder written by tools/make_shards.py")
    p.add_argument("--split", default="train")
    p.add_argument("--teacher", required=True, help="teacher folder or preset")
    p.add_argument("--proposer", required=True, help="dual encoder folder or preset that proposes candidates")
    p.add_argument("--candidates", type=int, default=16, help="M: candidates per image and per caption")
    p.add_argument("--directions", default="i2t,t2i",
                   help="what to propose and score: i2t (captions per image), t2i (images per caption) or both; "
                        "the positives are always scored")
    p.add_argument("--out", required=True, help="signals folder (manifest.json + {split}.pt)")
    p.add_argument("--teacher-zero", type=int, choices=(0, 3), help="default 3 with more than one rank")
    p.add_argument("--max-images", type=int, help="score the first N images of the split (measurements)")
    p.add_argument("--pairs-per-call", type=int, default=256, help="teacher pairs per forward")
    p.add_argument("--pairs-per-chunk", type=int, default=PAIRS_PER_CHUNK, help="pairs between resume points")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.candidates < 1 or args.pairs_per_call < 1 or args.pairs_per_chunk < 1:
        raise ConfigError("--candidates, --pairs-per-call and --pairs-per-chunk must be >= 1")
    args.directions = parse_directions(args.directions)
    return args


def _block_gather(values: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Every rank's block of rows, on every rank (integers travel as float64: exact below 2^53)."""
    if world == 1:
        return values
    return comm.gather_blocks(values.double(), total, world).to(values.dtype)


def propose(proposer, split, M: int, rank: int, world: int, directions=("i2t", "t2i")):
    """Step 1: the proposer's top-M captions per image and images per caption (rows of the split); a
    direction not asked for gets M = 0 columns."""
    images = _block_gather(embed_images(proposer, split.pixels[slice(*block_of_rank(split.num_images, rank, world))]),
                           split.num_images, world)
    start, end = block_of_rank(split.num_captions, rank, world)
    texts = _block_gather(embed_texts(proposer, split.captions[start:end]), split.num_captions, world)
    image_rows, caption_image = torch.arange(split.num_images), split.caption_image_index
    start, end = block_of_rank(split.num_images, rank, world)
    i2t = t2i = None
    if "i2t" in directions:
        i2t, _ = exact_top_candidates(images[start:end], texts, image_rows[start:end], caption_image, M)
        i2t = _block_gather(i2t, split.num_images, world)
    if "t2i" in directions:
        start, end = block_of_rank(split.num_captions, rank, world)
        t2i, _ = exact_top_candidates(texts[start:end], images, caption_image[start:end], image_rows, M)
        t2i = _block_gather(t2i, split.num_captions, world)
    return (torch.empty(split.num_images, 0, dtype=torch.long) if i2t is None else i2t,
            torch.empty(split.num_captions, 0, dtype=torch.long) if t2i is None else t2i)


def padded_chunk(images: torch.Tensor, captions: torch.Tensor, multiple: int):
    """A chunk's pairs padded (with its first pair) to a multiple of ranks x pairs per call, so that
    every rank makes the same number of teacher calls: a ZeRO-3 engine gathers its parameters in
    each call, and a rank with one call fewer would leave the others waiting."""
    pad = -images.numel() % multiple
    return torch.cat([images, images[:1].expand(pad)]), torch.cat([captions, captions[:1].expand(pad)])


def score_chunks(teacher, split, pairs, work: Path, args, rank: int, world: int) -> torch.Tensor:
    """Step 2: the teacher's score of every pair, chunk by chunk, resuming from finished chunks."""
    from tqdm.auto import tqdm
    images, captions = pairs
    total = images.numel()
    starts = list(range(0, total, args.pairs_per_chunk))
    done = {s for s in starts if (work / f"chunk-{s:012d}.pt").is_file()}
    comm.barrier()  # every rank has seen the same finished chunks before rank 0 writes a new one
    done_pairs = sum(min(args.pairs_per_chunk, total - s) for s in done)
    bar = tqdm(total=total, initial=done_pairs, desc=f"teacher scores ({args.split})", unit="pair",
               unit_scale=True, dynamic_ncols=True, mininterval=1.0,
               disable=args.no_progress or rank != 0)
    for start in starts:
        end = min(start + args.pairs_per_chunk, total)
        if start in done:
            continue
        failure.fault_point("teacher")
        chunk_images, chunk_captions = padded_chunk(images[start:end], captions[start:end],
                                                    world * args.pairs_per_call)
        scores = teacher_pair_scores(teacher, split, chunk_images, chunk_captions, args.pairs_per_call,
                                     rank, world)[:end - start]
        if rank == 0:
            tmp = work / f".chunk-{start:012d}.tmp"
            torch.save(scores.clone(), tmp)
            tmp.replace(work / f"chunk-{start:012d}.pt")
        bar.update(end - start)
    bar.close()
    comm.barrier()
    scores = torch.cat([torch.load(work / f"chunk-{s:012d}.pt", weights_only=True) for s in starts])
    comm.barrier()  # every rank has read the chunks before rank 0 removes them
    return scores


def work_folder(out: Path, split: str, teacher_fp: str, proposer_fp: str, split_fp: str, M: int,
                directions=("i2t", "t2i")) -> Path:
    """The resume folder of exactly this pass: other flags or models never reuse its chunks."""
    key = f"{teacher_fp}:{proposer_fp}:{split_fp}:{M}"
    if tuple(directions) != ("i2t", "t2i"):  # both directions keep the key they always had
        key += ":" + ",".join(directions)
    key = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    return out / f".partial-{split}-{key}"


def load_models(args, world: int, ds: dict):
    """(teacher engine, teacher fingerprint, proposer, proposer fingerprint); the fingerprints are
    taken before ZeRO-3 partitions the teacher."""
    tokenizer_dir = Path(args.shards) / "tokenizer"
    tokenizer_dir = tokenizer_dir if tokenizer_dir.is_dir() else None
    try:
        teacher = build_teacher(args.teacher, tokenizer_dir=tokenizer_dir)
        proposer = build_student(args.proposer, tokenizer_dir=tokenizer_dir).eval()
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    teacher_fp, proposer_fp = model_fingerprint(teacher), model_fingerprint(proposer)
    zero = args.teacher_zero if args.teacher_zero is not None else (3 if world > 1 else 0)
    if zero == 0:  # every rank holds the whole teacher: no engine needed (nor a launcher on 1 rank)
        return teacher.eval().requires_grad_(False), teacher_fp, proposer, proposer_fp
    return ds_engine.build_teacher_engine(teacher, ds, zero), teacher_fp, proposer, proposer_fp


def read_split(args):
    try:
        return read_eval_split(args.shards, args.split, max_images=args.max_images)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{args.shards}: {str(err).splitlines()[0]}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = comm.init()
    torch.manual_seed(0)  # presets built from names get the same weights on every rank
    ds = ds_engine.read_ds_config(args.ds, world)
    split = read_split(args)
    shards_fp = shards_fingerprint(args.shards, args.split)
    if args.max_images is not None:  # a subset is other data: it must never pass for the split
        shards_fp = f"{shards_fp}:first-{split.num_images}"
    teacher, teacher_fp, proposer, proposer_fp = load_models(args, world, ds)
    out = Path(args.out)
    work = work_folder(out, args.split, teacher_fp, proposer_fp, split.fingerprint, args.candidates,
                       args.directions)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    i2t, t2i = propose(proposer, split, args.candidates, rank, world, args.directions)
    proposal_seconds = time.perf_counter() - started
    pairs = signal_pairs(i2t, t2i, split.caption_image_index)
    scores = score_chunks(teacher, split, pairs, work, args, rank, world)
    seconds = time.perf_counter() - started
    entry = dict(shards_fingerprint=shards_fp, candidates=int(max(i2t.shape[1], t2i.shape[1])),
                 directions=list(args.directions), images=split.num_images,
                 captions=split.num_captions, pairs=int(scores.numel()), seconds=round(seconds, 2),
                 proposal_seconds=round(proposal_seconds, 2),
                 pairs_per_s=round(scores.numel() / max(seconds - proposal_seconds, 1e-9), 1), ranks=world)
    if rank == 0:
        table = table_from_scores(split.image_ids, split.caption_image_index, i2t, t2i, scores)
        path = write_split(out, args.split, table, {"spec": args.teacher, "fingerprint": teacher_fp},
                           {"spec": args.proposer, "fingerprint": proposer_fp}, entry)
        shutil.rmtree(work, ignore_errors=True)
        entry.update(file=str(path), bytes=path.stat().st_size,
                     bytes_per_1000_images=round(path.stat().st_size * 1000 / split.num_images))
        print(json.dumps(entry), flush=True)
    comm.barrier()
    comm.shutdown()
    return 0


if __name__ == "__main__":
    failure.run(main)
