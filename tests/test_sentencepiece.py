"""SentencePiece tokenizers (issue 14): the data tokenizer make_shards trains with `--tokenizer
sentencepiece`, and pretrained T5 / XLM-R style folders as the text towers' tokenizers.

Every folder here is made the real way: SentencePiece models trained by the `sentencepiece` package,
pretrained-style folders saved by transformers' own T5Tokenizer / XLMRobertaTokenizer. Token ids
are checked against the `sentencepiece` package's own encoding, so a tokenizer that loads but maps
words elsewhere (transformers 5's XTokenizer(vocab_file=...) builds a 5-token vocabulary in
silence) fails.
"""
import io
import json

import numpy as np
import pytest
import torch

from tests.fixtures import make_synthetic_shards
from tests.test_hf_folders import vtde_folder
from tests.test_models import tiny_vilt_config
from train.data import collate_train, load_tokenizer
from train.models.presets import build_student, build_teacher
from train.models.teacher_training import mask_words

SENTENCES = ["a red circle left of a blue square", "two shapes: a big green triangle above a cross",
             "the small white square is right of the purple circle", "three shapes below a yellow cross"]


@pytest.fixture(scope="module")
def sp_shards(tmp_path_factory):
    from tools import make_shards
    out = tmp_path_factory.mktemp("sp") / "shards"
    make_synthetic_shards(out, train=48, val=8, tokenizer=False)
    # the tokenizer alone, trained as make_shards trains it (the shards are kept: --resume)
    assert make_shards.main(["--source", "synthetic", "--out", str(out), "--train-images", "48",
                             "--val-images", "8", "--test-images", "0", "--maxcount", "16",
                             "--image-size", "32", "--quiet", "--resume", "--tokenizer", "sentencepiece"]) == 0
    return out


def train_captions(shards):
    from tools.make_shards import captions_in_shards
    names = json.loads((shards / "train.json").read_text())["shards"]
    return captions_in_shards(shards, names)


def test_make_shards_trains_a_sentencepiece_tokenizer_autotokenizer_loads(sp_shards):
    import sentencepiece
    from transformers import AutoTokenizer
    folder = sp_shards / "tokenizer"
    assert (folder / "spiece.model").is_file() and not (sp_shards / "tokenizer.tmp").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert type(tokenizer).__name__ == "AlbertTokenizer"
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id) == (0, 1, 2, 3)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.mask_token_id not in (None, 0, 1)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert len(tokenizer) == processor.get_piece_size() > 30  # the trained pieces, not 5 specials
    for caption in train_captions(sp_shards)[:50]:
        ids = tokenizer(caption)["input_ids"]
        assert ids == [2] + processor.encode(caption.lower()) + [3], caption
        assert tokenizer.unk_token_id not in ids
    assert load_tokenizer(folder).get_vocab() == tokenizer.get_vocab()  # the loader's own path


def test_the_project_models_train_on_it(sp_shards):
    folder = sp_shards / "tokenizer"
    tokenizer = load_tokenizer(folder)
    samples = [{"pixels": np.zeros((3, 32, 32), dtype=np.uint8), "caption": c, "image_id": i,
                "twin_id": -1, "group": -1} for i, c in enumerate(SENTENCES)]
    batch = next(collate_train(iter(samples), batch_size=4, tokenizer=tokenizer, max_length=32))
    assert batch["input_ids"][:, 0].eq(2).all() and (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    student = build_student("student-tiny", tokenizer_dir=folder)
    teacher = build_teacher("film-tiny", tokenizer_dir=folder)
    assert student.cfg["text_tower"]["vocab_size"] == len(tokenizer)
    texts = student.encode_text(batch["input_ids"], batch["attention_mask"])
    assert texts.shape[0] == 4 and torch.isfinite(texts).all()
    # the teacher's masked-word loss masks words with [MASK], never padding or [CLS]/[SEP]
    masked, labels = mask_words(batch["input_ids"], batch["attention_mask"], teacher.tokenizer, 0.3,
                                torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert chosen.any(1).all() and (masked[chosen] == tokenizer.mask_token_id).all()
    assert not torch.isin(batch["input_ids"][chosen], torch.tensor([0, 1, 2, 3])).any()


def test_unknown_tokenizer_kind_is_one_line_exit_2(tmp_path, capsys):
    from tools import make_shards
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(["--source", "synthetic", "--out", str(tmp_path), "--tokenizer", "bpe"])
    assert exit_info.value.code == 2
    assert "--tokenizer: invalid choice: 'bpe'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# pretrained sentencepiece tokenizers (T5 / XLM-R style folders) as text-tower tokenizers

def sentencepiece_model(**specials) -> bytes:
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 5), model_writer=model, model_type="unigram", vocab_size=60,
        hard_vocab_limit=False, character_coverage=1.0, minloglevel=2, num_threads=1, **specials)
    return model.getvalue()


def t5_folder(folder):
    """T5's layout: spiece.model, pad 0, </s> 1, <unk> 2, no bos; saved by T5Tokenizer itself."""
    from transformers import T5Tokenizer
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(sentencepiece_model(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    T5Tokenizer.from_pretrained(str(folder), extra_ids=0).save_pretrained(str(folder))
    return folder


def xlmr_folder(folder):
    """XLM-R's layout: sentencepiece.bpe.model (unk 0, <s> 1, </s> 2), ids shifted by fairseq's
    offset, <mask> last; saved by XLMRobertaTokenizer itself."""
    from transformers import XLMRobertaTokenizer
    folder.mkdir(parents=True)
    (folder / "sentencepiece.bpe.model").write_bytes(sentencepiece_model(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    XLMRobertaTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder


def own_encoding(folder, model_name, text):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(folder / model_name)).encode(text)


def test_t5_style_tokenizer_inside_a_dual_encoder_folder(tmp_path):
    from transformers import AutoTokenizer
    words = AutoTokenizer.from_pretrained(str(t5_folder(tmp_path / "t5")))
    text = SENTENCES[0]
    assert words(text)["input_ids"] == own_encoding(tmp_path / "t5", "spiece.model", text) + [1]
    student = build_student(str(vtde_folder(words, tmp_path / "vtde")))  # its folder's own tokenizer
    assert type(student.tokenizer).__name__ == "T5Tokenizer"
    tokens = student.tokenize([text, SENTENCES[1]])
    assert tokens["input_ids"][0, :len(words(text)["input_ids"])].tolist() == words(text)["input_ids"]
    assert torch.isfinite(student.encode_text(**tokens)).all()


def test_xlmr_style_tokenizer_given_with_tokenizer_flag(tmp_path):
    from transformers import AutoTokenizer, ViltForImageAndTextRetrieval
    folder = xlmr_folder(tmp_path / "xlmr")
    words = AutoTokenizer.from_pretrained(str(folder))
    text = SENTENCES[2]
    fairseq = [i + 1 for i in own_encoding(folder, "sentencepiece.bpe.model", text)]  # <pad> at 1
    assert words(text)["input_ids"] == [0] + fairseq + [2]
    assert words.mask_token_id == len(words) - 1
    bare = tmp_path / "vilt"  # a transformers ViLT folder saved without tokenizer files
    ViltForImageAndTextRetrieval(tiny_vilt_config(len(words), pad_token_id=words.pad_token_id)).save_pretrained(str(bare))
    with pytest.raises(ValueError, match="give --tokenizer FOLDER"):
        build_teacher(str(bare))
    teacher = build_teacher(str(bare), tokenizer=str(folder))
    assert type(teacher.tokenizer).__name__ == "XLMRobertaTokenizer"
    tokens = teacher.tokenize([text])
    assert tokens["input_ids"][0].tolist()[:len(fairseq) + 2] == [0] + fairseq + [2]
    scores = teacher(teacher.preprocess_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)),
                     tokens["input_ids"], tokens["attention_mask"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_tokenizer_benchmark_trains_both_kinds_on_the_same_captions(sp_shards, tmp_path, capsys):
    from tools import benchmark
    assert benchmark.main(["tokenizer", "--shards", str(sp_shards), "--split", "val", "--repeats", "1",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tokenizer.json").read_text())
    rows = report["tokenizers"]
    assert set(rows) == {"wordpiece", "sentencepiece"} and report["captions"] == 8 * 5
    assert rows["sentencepiece"]["class"] == "AlbertTokenizer"
    for row in rows.values():  # every caption gets at least [CLS] word [SEP]
        assert row["tokens_per_caption"] >= 3 and row["unk_share"] < 0.05 and row["captions_per_s"] > 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["wordpiece_vocab"] == rows["wordpiece"]["vocab"]
