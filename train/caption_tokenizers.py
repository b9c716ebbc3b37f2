"""The data tokenizer trained on the training captions: WordPiece (train/data.py, train_tokenizer) or
SentencePiece (a unigram model trained with the `sentencepiece` package), both saved so that
`transformers.AutoTokenizer.from_pretrained(folder)` loads them with the special tokens the models
need: padding (id 0), unknown, a first and a last token, and a mask token for the teacher's
masked-word loss.

The SentencePiece model is saved as an ALBERT-style tokenizer: ALBERT's tokenizer is the one in
transformers built on a SentencePiece unigram model with `[CLS]`, `[SEP]` and `[MASK]` (T5's has
no mask or first token, XLM-R's shifts every id by one), and it lower-cases as the WordPiece one
does. `spiece.model` stays in the folder, so the `sentencepiece` package reads it too.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

TOKENIZER_KINDS = ("wordpiece", "sentencepiece")
SPIECE_NAME = "spiece.model"

# ALBERT's ids: pad 0 and unk 1 (its tokenizer's Unigram model takes unk at 1), [CLS] 2, [SEP] 3.
SENTENCEPIECE_SPECIALS = dict(pad_id=0, pad_piece="<pad>", unk_id=1, unk_piece="<unk>",
                              bos_id=2, bos_piece="[CLS]", eos_id=3, eos_piece="[SEP]",
                              control_symbols=["[MASK]"])


def train_caption_tokenizer(kind: str, captions, out_dir, vocab_size: int = 8000):
    """Train the `kind` tokenizer on captions and save it to out_dir; returns it loaded back."""
    if kind == "wordpiece":
        from train.data import train_tokenizer
        return train_tokenizer(captions, out_dir, vocab_size=vocab_size)
    if kind == "sentencepiece":
        return train_sentencepiece(captions, out_dir, vocab_size=vocab_size)
    raise ValueError(f"tokenizer kind {kind!r}: use {' or '.join(TOKENIZER_KINDS)}")


def sentencepiece_model_bytes(captions, vocab_size: int) -> bytes:
    """A unigram SentencePiece model of lower-cased captions (the tokenizer lower-cases its input).

    `vocab_size` is an upper bound, as for WordPiece: a small caption set has fewer pieces to offer
    (hard_vocab_limit off). Every character of the captions gets a piece (coverage 1.0: captions
    are short and a character dropped to <unk> loses a word)."""
    import sentencepiece

    lowered = [caption.lower() for caption in captions if caption.strip()]
    if not lowered:
        raise ValueError("no captions to train a SentencePiece tokenizer on")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lowered), model_writer=model, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2,
        num_threads=1, **SENTENCEPIECE_SPECIALS)
    return model.getvalue()


def train_sentencepiece(captions, out_dir, vocab_size: int = 8000, model_max_length: int = 64):
    """Train SentencePiece on the captions; save it as a transformers tokenizer folder (atomically)."""
    from transformers import AlbertTokenizer

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / SPIECE_NAME).write_bytes(sentencepiece_model_bytes(captions, vocab_size))
    # from_pretrained converts spiece.model into the fast tokenizer; AlbertTokenizer(vocab_file=...)
    # would not: in transformers 5 it silently builds a 5-token vocabulary instead.
    tokenizer = AlbertTokenizer.from_pretrained(str(tmp), model_max_length=model_max_length)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # readers never see a half-written tokenizer folder
    return tokenizer
