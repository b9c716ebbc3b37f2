"""The data tokenizers side by side (`python tools/benchmark.py tokenizer`): each kind that
make_shards can train (WordPiece, SentencePiece) is trained on the same train captions of a shard
folder, then measured on a held-out split's captions: training time, vocabulary size, tokens per
caption (the [CLS]/[SEP] pair included), the share of <unk> tokens, and encoding speed (captions/s,
one batch call as the loader makes, median of --repeats). Writes {out}/tokenizer.json; prints a
table and, last, one JSON line.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from train.caption_tokenizers import TOKENIZER_KINDS, train_caption_tokenizer


def add_parser(commands) -> None:
    bench = commands.add_parser("tokenizer", help="WordPiece vs SentencePiece on the shards' captions")
    bench.add_argument("--shards", default="shards/synthetic")
    bench.add_argument("--split", default="test", help="held-out captions measured")
    bench.add_argument("--vocab-size", type=int, default=8000)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--out", default="runs/benchmark", help="folder for tokenizer.json")


def split_captions(shards, split: str) -> list:
    """Every caption of a split, read from its shards' json (no image is decoded)."""
    from train.data import load_manifest
    from train.samples import read_shard, sample_captions, sample_meta
    captions = []
    for path in load_manifest(shards, split)["paths"]:
        for raw in read_shard(path):
            captions += sample_captions(raw, sample_meta(raw))
    return captions


def measure(tokenizer, captions: list, repeats: int) -> dict:
    """Tokens per caption, <unk> share and encoding speed of one tokenizer on captions."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = tokenizer(captions, truncation=False)["input_ids"]
        seconds.append(time.perf_counter() - start)
    lengths = sorted(len(ids) for ids in encoded)
    unknown = sum(ids.count(tokenizer.unk_token_id) for ids in encoded)
    return {"vocab": len(tokenizer), "tokens_per_caption": round(statistics.mean(lengths), 3),
            "tokens_p95": lengths[int(0.95 * (len(lengths) - 1))], "tokens_max": lengths[-1],
            "unk_share": round(unknown / sum(lengths), 6),
            "captions_per_s": round(len(captions) / statistics.median(seconds))}


def run_tokenizer_benchmark(args) -> int:
    train, held_out = split_captions(args.shards, "train"), split_captions(args.shards, args.split)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in TOKENIZER_KINDS:
            start = time.perf_counter()
            tokenizer = train_caption_tokenizer(kind, train, Path(tmp) / kind, vocab_size=args.vocab_size)
            trained_s = time.perf_counter() - start
            rows[kind] = {"class": type(tokenizer).__name__, "train_seconds": round(trained_s, 2),
                          **measure(tokenizer, held_out, args.repeats)}
    report = {"benchmark": "tokenizer", "shards": args.shards, "train_captions": len(train),
              "split": args.split, "captions": len(held_out), "vocab_size_max": args.vocab_size,
              "tokenizers": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(report, indent=2))
    columns = ["class", "train_seconds", "vocab", "tokens_per_caption", "tokens_p95", "tokens_max",
               "unk_share", "captions_per_s"]
    print(f"{'kind':<14}" + "".join(f"{c:>20}" for c in columns))
    for kind, row in rows.items():
        print(f"{kind:<14}" + "".join(f"{row[c]!s:>20}" for c in columns))
    print(f"wrote {out / 'tokenizer.json'}")
    print(json.dumps({f"{kind}_{c}": row[c] for kind, row in rows.items() for c in columns[1:]}))
    return 0
