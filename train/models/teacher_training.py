"""Fine-tuning a cross-encoder teacher (`--stage teacher`): matching loss with hard negatives.

Per image, a cross-entropy over [its caption, hard negative captions...]:
  - the twin's caption (the batch row whose image_id is this row's twin_id: same objects, other binding),
  - its own caption with attribute/relation words swapped (colours, nouns, left/right, above/below...),
  - in-batch captions sampled by word overlap with its caption (ALBEF-style hard in-batch sampling),
  - several random in-batch captions (docs/platform_notes.md: with one random negative the teacher ranked
    whole galleries poorly).
Per caption, a cross-entropy over [its image, the twin image, similar and random in-batch images].
Every scored pair is scored once: random negatives pair row i with row partner(i), which serves as
image i's caption negative and as caption partner(i)'s image negative at the same time.
Optionally a masked-word loss (docs/platform_notes.md: the one change that helped a tiny ViLT from scratch).

`teacher` may be the model or a DeepSpeed engine wrapping it: compute goes through teacher(...)
(so ZeRO hooks run); tokenizer and preprocessing are read from the unwrapped module.
"""
import random
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class TeacherTrainingConfig:
    """The matching loss of `--stage teacher`; also the run config's `teacher_loss` section (each field
    a flag of its own). The defaults are the recipe that trained assets/teacher-film; the optimiser's
    part of the recipe (lr, warm-up, weight decay) is train/config.py's teacher-stage defaults.

    Negatives per image (and per caption): a step costs about one FiLM pass per scored pair. 3 random
    + 1 similar is the recipe of assets/teacher-film on the specific captions (docs/RESULTS.md, session
    4): a teacher meant to rank whole galleries needs more than one random negative per image."""
    random_negatives: int = 3             # random in-batch captions (and images) per image
    similar_negatives: int = 1            # in-batch captions sampled by similarity (ALBEF-style)
    # A saved student whose image-caption cosine picks the similar negatives instead of word
    # overlap: trains the teacher on the kind of candidates DCD will ask it to rank.
    negatives_student: Optional[str] = None
    similarity_temperature: float = 0.1   # sampling temperature over the similarities
    perturbed_negative: bool = True       # the own caption with colours / nouns / relations swapped
    caption_loss_weight: float = 1.0      # weight of the caption -> image cross-entropy
    mlm_weight: float = 0.0               # masked-word auxiliary loss (ViLT from scratch needs it)


MLM_PROBABILITY = 0.25  # share of a caption's real words the masked-word loss masks


# ----------------------------------------------------------------------------------------------
# caption perturbation: generic word lists, so it works on real captions too

COLOURS = ("red green blue yellow purple orange cyan magenta pink brown black white gray grey "
           "violet gold silver").split()
NOUNS = ("circle square triangle star rectangle diamond hexagon pentagon cross heart ellipse oval cube "
         "sphere ball box cylinder cone circles squares triangles stars man woman boy girl child dog cat "
         "horse cow sheep bird car bus truck bike train plane boat table chair bed couch shirt hat "
         "umbrella").split()
OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom",
             "bottom": "top", "over": "under", "under": "over", "big": "small", "small": "big",
             "large": "small", "up": "down", "down": "up", "inside": "outside", "outside": "inside",
             "tall": "short", "short": "tall", "before": "after", "after": "before"}
WORD_SPLIT = re.compile(r"(\W+)")


def _match_case(replacement, original):
    return replacement.capitalize() if original[:1].isupper() else replacement


def _swap_options(words, vocabulary):
    """Pairs of positions holding two different words of the vocabulary (swapping them rebinds)."""
    positions = [i for i, w in enumerate(words) if w.lower() in vocabulary]
    return [(a, b) for ai, a in enumerate(positions) for b in positions[ai + 1:]
            if words[a].lower() != words[b].lower()]


def perturb_caption(caption, rng):
    """A caption with one binding or attribute changed, or None when no listed word occurs.
    Preference: swap two colours or two nouns, or flip a relation (binding changes); otherwise
    replace one colour or noun by another (attribute change)."""
    words = WORD_SPLIT.split(caption)
    options = []
    for vocabulary in (COLOURS, NOUNS):
        options += [("swap", pair) for pair in _swap_options(words, vocabulary)]
    options += [("flip", i) for i, w in enumerate(words) if w.lower() in OPPOSITES]
    if not options:
        options = [("replace", (i, vocabulary)) for vocabulary in (COLOURS, NOUNS)
                   for i, w in enumerate(words) if w.lower() in vocabulary]
    if not options:
        return None
    action, where = rng.choice(options)
    words = list(words)
    if action == "swap":
        a, b = where
        words[a], words[b] = _match_case(words[b].lower(), words[a]), _match_case(words[a].lower(), words[b])
    elif action == "flip":
        words[where] = _match_case(OPPOSITES[words[where].lower()], words[where])
    else:
        i, vocabulary = where
        others = [w for w in vocabulary if w != words[i].lower()]
        words[i] = _match_case(rng.choice(others), words[i])
    perturbed = "".join(words)
    return perturbed if _normalise(perturbed) != _normalise(caption) else None


def _normalise(caption):
    return " ".join(re.findall(r"\w+", caption.lower()))


# ----------------------------------------------------------------------------------------------
# choosing negatives (pure: index tensors in, index tensors out)

def twin_rows(image_ids, twin_ids):
    """Row of each row's twin in the batch, -1 when it has none or the twin is not in the batch."""
    row_of = {int(image_id): row for row, image_id in enumerate(image_ids.tolist())}
    return torch.tensor([row_of.get(int(t), -1) if t >= 0 else -1 for t in twin_ids.tolist()],
                        dtype=torch.long)


def positive_mask(image_ids, captions):
    """[B, B] True where caption j is (or may be) a positive for image i: the same image, or the
    very same text (identical captions of different images are not negatives of each other)."""
    same_image = image_ids[:, None] == image_ids[None, :]
    texts = [_normalise(c) for c in captions]
    same_text = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
    return same_image | same_text


def word_overlap(captions):
    """[B, B] Jaccard overlap of the captions' word sets: a cheap, model-free similarity."""
    sets = [set(_normalise(c).split()) for c in captions]
    return torch.tensor([[len(a & b) / max(1, len(a | b)) for b in sets] for a in sets])


def sample_similar(similarity, forbidden, k, temperature, generator=None):
    """[B, k] columns sampled without replacement with probability softmax(sim / T) over allowed
    columns (ALBEF's hard in-batch sampling); -1 where a row has fewer than k allowed columns."""
    batch = similarity.shape[0]
    picks = torch.full((batch, k), -1, dtype=torch.long)
    if k == 0:
        return picks
    weights = torch.softmax((similarity / temperature).masked_fill(forbidden, float("-inf")), dim=1)
    for row in range(batch):
        allowed = int((~forbidden[row]).sum())
        if allowed == 0:
            continue
        take = min(k, allowed)
        picks[row, :take] = torch.multinomial(weights[row], take, replacement=False, generator=generator)
    return picks


def random_partners(batch, k, generator=None):
    """partners[i, s] = the row s+1 places after i in a random cyclic order. Pairing image i with
    caption partners[i, s] gives caption partners[i, s] the image i: one pair, two negatives."""
    if batch < 2 or k == 0:
        return torch.full((batch, 0), -1, dtype=torch.long)
    order = torch.randperm(batch, generator=generator)
    place = torch.empty_like(order)
    place[order] = torch.arange(batch)
    shifts = torch.arange(1, min(k, batch - 1) + 1)
    return order[(place[:, None] + shifts[None, :]) % batch]


class PairTable:
    """Collects (image row, text row) pairs once each and the candidate lists that point into them."""

    def __init__(self):
        self.index_of = {}

    def add(self, image, text):
        key = (int(image), int(text))
        if key not in self.index_of:
            self.index_of[key] = len(self.index_of)
        return self.index_of[key]

    def tensors(self, device):
        pairs = torch.tensor(list(self.index_of), dtype=torch.long).view(-1, 2)
        return pairs[:, 0].to(device), pairs[:, 1].to(device)


def build_candidates(image_ids, twin_ids, captions, perturbed, cfg, generator=None, similarity=None):
    """All the indexing of the matching loss, without a model.

    Texts are numbered: batch captions 0..B-1, then the perturbed captions B.. (in `perturbed` order,
    None entries skipped). `similarity` [B, B] (image row x caption column) picks the similar
    negatives, e.g. a student's cosine similarities; None: word overlap of the captions. Returns
    dict with image_index/text_index (the unique pairs to score), image_rows/caption_rows [B, 1+C]
    (pair positions; column 0 is the positive) and their validity masks, and twin_rows."""
    batch = len(captions)
    twins = twin_rows(image_ids, twin_ids)
    positives = positive_mask(image_ids, captions)
    overlap = word_overlap(captions) if similarity is None else similarity.float().cpu()
    similar_texts = sample_similar(overlap, positives, cfg.similar_negatives, cfg.similarity_temperature,
                                   generator)
    similar_images = sample_similar(overlap.t(), positives.t(), cfg.similar_negatives,
                                    cfg.similarity_temperature, generator)
    partners = random_partners(batch, cfg.random_negatives, generator)
    perturbed_text = {}
    for row, text in enumerate(perturbed):
        if text is not None:
            perturbed_text[row] = batch + len(perturbed_text)

    table = PairTable()  # pairs are numbered in the order offered: every image's row, then every caption's
    image_rows = _image_rows(table, twins, positives, perturbed_text, similar_texts, partners, cfg)
    caption_rows = _caption_rows(table, twins, positives, similar_images, partners, cfg)
    image_index, text_index = table.tensors(image_ids.device)
    return {
        "image_index": image_index, "text_index": text_index,
        "image_rows": torch.tensor([c for c, _ in image_rows], dtype=torch.long),
        "image_valid": torch.tensor([v for _, v in image_rows], dtype=torch.bool),
        "caption_rows": torch.tensor([c for c, _ in caption_rows], dtype=torch.long),
        "caption_valid": torch.tensor([v for _, v in caption_rows], dtype=torch.bool),
        "twin_rows": twins,
        "num_texts": batch + len(perturbed_text),
    }


def _image_rows(table, twins, positives, perturbed_text, similar_texts, partners, cfg) -> list:
    """Per image: [(pair of its caption, pairs of its negative captions...), validity]."""
    batch = len(twins)
    rows = []
    for i in range(batch):
        candidates = [table.add(i, i)]
        valid = [True]

        def offer_caption(text):
            ok = text >= 0 and (text >= batch or not positives[i, text])
            candidates.append(table.add(i, text) if ok else 0)
            valid.append(ok)

        offer_caption(int(twins[i]))
        if cfg.perturbed_negative:
            offer_caption(perturbed_text.get(i, -1))
        for text in similar_texts[i].tolist() + partners[i].tolist():
            offer_caption(text)
        rows.append((candidates, valid))
    return rows


def _caption_rows(table, twins, positives, similar_images, partners, cfg) -> list:
    """Per caption: [(pair of its image, pairs of its negative images...), validity], all rows one
    width; a random pair (image i, caption partner) also serves as the caption's negative image."""
    batch = len(twins)
    backward = {}  # caption -> images that already got it as a random negative
    for i in range(batch):
        for text in partners[i].tolist():
            backward.setdefault(text, []).append(i)
    rows = []
    for j in range(batch):
        candidates, valid = [table.add(j, j)], [True]

        def offer_image(image):
            ok = image >= 0 and not positives[image, j]
            candidates.append(table.add(image, j) if ok else 0)
            valid.append(ok)

        offer_image(int(twins[j]))
        for image in similar_images[j].tolist() + backward.get(j, []):
            offer_image(image)
        width = 2 + cfg.similar_negatives + partners.shape[1]
        while len(candidates) < width:  # same width for every row
            candidates.append(0)
            valid.append(False)
        rows.append((candidates, valid))
    return rows


# ----------------------------------------------------------------------------------------------
# losses

def _unwrap(teacher):
    """The CrossEncoder inside a DeepSpeed engine (or the teacher itself)."""
    return getattr(teacher, "module", teacher)


def candidate_cross_entropy(pair_logits, rows, valid):
    """Cross-entropy with the positive in column 0; invalid columns are masked out.
    Returns (loss, accuracy: positive strictly above every valid negative)."""
    logits = pair_logits[rows.to(pair_logits.device)].masked_fill(~valid.to(pair_logits.device), float("-inf"))
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target)
    has_negative = valid[:, 1:].any(dim=1).to(logits.device)
    if not has_negative.any():
        return loss, logits.new_tensor(float("nan"))
    correct = logits[:, 0] > logits[:, 1:].amax(dim=1)
    return loss, correct[has_negative].float().mean().detach()


def mask_words(input_ids, attention_mask, tokenizer, probability, generator=None):
    """Masks maskable tokens (not special, not padding) with the given probability, at least one per
    caption. Returns (masked ids, labels with -100 where nothing is to be predicted)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    maskable = (attention_mask.bool() & ~torch.isin(input_ids, special.to(input_ids.device))).cpu()
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    for row in torch.nonzero(maskable.any(1) & ~chosen.any(1)).flatten().tolist():
        options = torch.nonzero(maskable[row]).flatten()
        chosen[row, options[torch.randint(len(options), (1,), generator=generator)]] = True
    chosen = chosen.to(input_ids.device)
    mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
    masked = input_ids.masked_fill(chosen, mask_id)
    labels = input_ids.masked_fill(~chosen, -100)
    return masked, labels


def _pairwise_accuracy(pair_logits, rows, valid, column):
    """Positive beats the candidate in `column` (the twin), over rows where that candidate exists."""
    ok = valid[:, column]
    if not ok.any():
        return pair_logits.new_tensor(float("nan"))
    scores = pair_logits.detach()[rows.to(pair_logits.device)]
    return (scores[:, 0] > scores[:, column])[ok.to(pair_logits.device)].float().mean()


def teacher_matching_loss(teacher, batch, cfg, generator=None, similarity=None):
    """The `--stage teacher` loss on a training batch (train/data.py): needs pixels, captions,
    image_ids and twin_ids; `similarity` as in `build_candidates`. Returns loss (to backprop) and
    detached parts for logging."""
    model = _unwrap(teacher)
    pixels = batch["pixels"]
    device = pixels.device
    captions = list(batch["captions"])
    image_ids = batch["image_ids"].cpu()
    twin_ids = batch.get("twin_ids", torch.full_like(image_ids, -1)).cpu()

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rng = random.Random(seed)  # seeded from torch so a torch seed fixes the perturbations too
    perturbed = [perturb_caption(c, rng) if cfg.perturbed_negative else None for c in captions]
    plan = build_candidates(image_ids, twin_ids, captions, perturbed, cfg, generator, similarity)

    texts = captions + [p for p in perturbed if p is not None]
    tokens = {k: v.to(device) for k, v in model.tokenize(texts).items()}
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    pixel_values = model.preprocess_images(pixels).to(dtype)

    pair_logits = teacher(pixel_values, tokens["input_ids"], tokens["attention_mask"],
                          plan["image_index"].to(device), plan["text_index"].to(device)).float()
    loss_i2t, acc_i2t = candidate_cross_entropy(pair_logits, plan["image_rows"], plan["image_valid"])
    loss_t2i, acc_t2i = candidate_cross_entropy(pair_logits, plan["caption_rows"], plan["caption_valid"])
    loss_match = (loss_i2t + cfg.caption_loss_weight * loss_t2i) / (1.0 + cfg.caption_loss_weight)

    loss_mlm = pair_logits.new_zeros(())
    mlm_acc = pair_logits.new_tensor(float("nan"))
    if cfg.mlm_weight > 0 and getattr(model, "has_masked_word_head", False):
        batch_ids = tokens["input_ids"][: len(captions)]
        batch_mask = tokens["attention_mask"][: len(captions)]
        masked, labels = mask_words(batch_ids, batch_mask, model.tokenizer, MLM_PROBABILITY, generator)
        word_logits = teacher(pixel_values, masked, batch_mask, task="mlm").float()
        loss_mlm = F.cross_entropy(word_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        predicted = labels != -100
        mlm_acc = (word_logits.argmax(-1)[predicted] == labels[predicted]).float().mean().detach()

    return {
        "loss": loss_match + cfg.mlm_weight * loss_mlm,
        "loss_match": loss_match.detach(),
        "loss_i2t": loss_i2t.detach(),
        "loss_t2i": loss_t2i.detach(),
        "loss_mlm": loss_mlm.detach(),
        "match_acc": acc_i2t,
        "match_acc_t2i": acc_t2i,
        "twin_acc_i2t": _pairwise_accuracy(pair_logits, plan["image_rows"], plan["image_valid"], 1),
        "twin_acc_t2i": _pairwise_accuracy(pair_logits, plan["caption_rows"], plan["caption_valid"], 1),
        "mlm_acc": mlm_acc,
        "num_pairs": pair_logits.new_tensor(float(pair_logits.numel())),
    }
