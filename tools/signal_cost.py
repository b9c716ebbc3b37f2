"""When one stored scoring pass beats the online teacher end to end (tools/ablate.py, tools/pipeline.py).

The pass scores M pairs per image and M + 1 per caption once (tools/score_teacher.py); every online
DCD step pays the teacher again. Both figures were measured on 2 CPU ranks for the default data,
teacher and student (docs/RESULTS.md, "Stored teacher signals"); on other hardware they are a guide.
"""
from __future__ import annotations

import json
from pathlib import Path

# online DCD step minus stored-signal step: the teacher's 0.233 s of a 0.476 s step, less the
# stored step's ~0.02 s of batch composition and lookups
SAVED_SECONDS_PER_STEP = 0.21
# the pass's throughput, proposals included: 481 pairs/s measured with the job at 38% of the 2 cores
# (load ~13), 1,058 pairs/s on a 400-image split at lower load; 1,000 errs on the side of online
SCORING_PAIRS_PER_S = 1000.0


def scoring_seconds(images: int, captions: int, candidates: int) -> float:
    return (images * candidates + captions * (candidates + 1)) / SCORING_PAIRS_PER_S


def stored_is_faster(shards, runs: int, steps: int, candidates: int = 16) -> bool:
    """Whether one pass over the train split of `shards` costs less than the teacher's share of
    `runs` online runs of `steps` steps."""
    manifest = json.loads((Path(shards) / "train.json").read_text())
    pass_s = scoring_seconds(manifest.get("num_samples", 0), manifest.get("num_captions", 0), candidates)
    return runs * steps * SAVED_SECONDS_PER_STEP > pass_s
