"""When one stored scoring pass beats the online teacher end to end (tools/ablate.py, tools/pipeline.py).

The pass scores, once, M pairs per image for i2t, M per caption for t2i, and every positive
(tools/score_teacher.py); every online DCD step pays the teacher again. The figures were measured
on 2 CPU ranks for the default data, teacher and student (docs/RESULTS.md, "Stored teacher
signals"); on other hardware they are a guide, and `measured_costs` reads the machine's own from
a `tools/benchmark.py train --teacher-signals` run (--signal-costs of ablate and the pipeline).
"""
from __future__ import annotations

import json
from pathlib import Path

# online DCD step minus stored-signal step with the published flags: the teacher's 0.233 s of a
# 0.476 s step, less the stored step's ~0.02 s of batch composition and lookups
SAVED_SECONDS_PER_STEP = 0.21
# the same for tools/recipes.py EVERY_QUERY_KD: online 1.063 s, stored (--stored-batches embedded)
# 0.778 s a step, median of 2 rotating rounds on the quiet default (session 7). On a faster machine
# (session 8: contrastive 0.22 s) the saving was 0.04-0.09 s a step against a 65 s pass: auto
# still chose online for one default run, as here.
EVERY_QUERY_KD_SAVED_SECONDS_PER_STEP = 0.28
# the pass's teacher throughput: 2,298 pairs/s on the default's 20,000 images (i2t, M = 16, quiet
# 2-core CPU), 1,058 on a 400-image split under load; 1,000 errs on the side of online
SCORING_PAIRS_PER_S = 1000.0


def scoring_pairs(images: int, captions: int, candidates: int, directions=("i2t", "t2i")) -> int:
    return (images * candidates * ("i2t" in directions) + captions * candidates * ("t2i" in directions)
            + captions)


def scoring_seconds(images: int, captions: int, candidates: int, directions=("i2t", "t2i"),
                    pairs_per_s: float = SCORING_PAIRS_PER_S) -> float:
    return scoring_pairs(images, captions, candidates, directions) / pairs_per_s


def pass_size(flags: list) -> tuple:
    """(candidates, directions) of tools/score_teacher.py flags such as tools/recipes.scoring_flags'."""
    given = dict(zip(flags[::2], flags[1::2]))
    return int(given["--candidates"]), tuple(given["--directions"].split(","))


def stored_is_faster(shards, runs: int, steps: int, candidates: int = 16, directions=("i2t", "t2i"),
                     saved_seconds_per_step: float = SAVED_SECONDS_PER_STEP,
                     pairs_per_s: float = SCORING_PAIRS_PER_S) -> bool:
    """Whether one pass over the train split of `shards` costs less than the teacher's share of
    `runs` online runs of `steps` steps."""
    manifest = json.loads((Path(shards) / "train.json").read_text())
    pass_s = scoring_seconds(manifest.get("num_samples", 0), manifest.get("num_captions", 0), candidates, directions,
                             pairs_per_s)
    return runs * steps * saved_seconds_per_step > pass_s


def measured_costs(path) -> tuple:
    """(seconds a stored step saves over an online one, pairs per second of the whole pass): the
    last two arguments of `stored_is_faster`, as
    `tools/benchmark.py train --teacher T --teacher-signals S` measured them on this machine
    (its train.json): the figures above are a 2-core CPU's, and a GPU teacher changes both. Benchmark
    with the DCD flags the runs will use (--distill-args). ValueError naming the file and field."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable as a benchmark JSON ({type(error).__name__})") from None

    def number(*keys) -> float:
        value = data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{path}: no number at {'.'.join(keys)} (the train.json of tools/benchmark.py "
                             "train with --teacher and --teacher-signals)")
        return float(value)

    seconds = number("scoring", "seconds")
    if seconds <= 0:
        raise ValueError(f"{path}: scoring.seconds is {seconds}")
    saved = number("stages", "distill", "time/step") - number("stages", "stored", "time/step")
    return saved, number("scoring", "pairs") / seconds


def auto_costs(path, saved_seconds_per_step: float) -> tuple:
    """What auto weighs (`stored_is_faster`'s last two arguments): measured_costs(path) when a
    benchmark is given (--signal-costs), else `saved_seconds_per_step` and SCORING_PAIRS_PER_S."""
    return measured_costs(path) if path else (saved_seconds_per_step, SCORING_PAIRS_PER_S)
