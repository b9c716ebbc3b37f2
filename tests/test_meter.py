"""METER teacher backend: official-checkpoint key mapping against a reference forward written here with
METER's own module structure and names, pair indexing, training, save/load, and the student built from
its towers. Everything runs at the `meter-tiny` size on CPU."""
import math
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.models import meter
from train.models.meter import (MeterTeacher, build_meter_teacher, meter_clip16_roberta_config,
                                meter_config_from_state_dict)
from train.models.meter_checkpoint import load_meter_checkpoint, map_meter_state_dict
from train.models.meter_student import meter_student_from_teacher

WORDS = ("a red blue green small large circle square triangle left right of the above below "
         "and next to is on in picture image").split()
CAPTIONS = ["a red circle left of a blue square", "a green triangle",
            "a small blue circle above a large red square on the left", "a square"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small WordPiece tokenizer saved the way the data tokenizer is ([PAD] = 0, [CLS] first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + list(WORDS))}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_teacher(tokenizer_dir):
    torch.manual_seed(0)
    return build_meter_teacher("meter-tiny", tokenizer_dir).eval()


def images(count, size=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


# ----------------------------------------------------------------------------------------------------
# Reference METER, written from the structure of the public METER code (meter_module.py: infer() and
# the retrieval score rank_output(cls_feats)[:, 0]; bert_model.py: BertCrossLayer; clip_model.py: OpenAI
# CLIP's VisualTransformer; heads.py: Pooler, ITMHead). Its state_dict() has exactly METER's key names.

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClipBlock(nn.Module):  # clip_model.ResidualAttentionBlock
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # x: [length, batch, width], CLIP's layout
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, width, blocks, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ClipBlock(width, heads) for _ in range(blocks)])


class ClipVisual(nn.Module):  # clip_model.VisualTransformer
    def __init__(self, image_size, patch, width, blocks, heads):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(
            torch.randn((image_size // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = ClipTransformer(width, blocks, heads)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer.resblocks(x.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x)


class ClipWithUnusedTextParts(nn.Module):  # clip_model.CLIP: METER's `vit_model`
    def __init__(self, config):
        super().__init__()
        self.visual = ClipVisual(config.image_size, config.patch_size, config.vision_width,
                                 config.vision_layers, config.vision_heads)
        # CLIP's text side: built by METER, saved in its checkpoints, never run.
        self.token_embedding = nn.Embedding(30, 16)
        self.positional_embedding = nn.Parameter(torch.randn(7, 16))
        self.ln_final = nn.LayerNorm(16)


class BertSelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, hidden, context, additive_mask):
        def split(x):
            return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.query(hidden)), split(self.key(context)), split(self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if additive_mask is not None:
            scores = scores + additive_mask
        out = scores.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(hidden.shape)


class BertSelfOutput(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)


class BertAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.self = BertSelfAttention(width, heads)
        self.output = BertSelfOutput(width)

    def forward(self, hidden, context, additive_mask):
        attended = self.self(hidden, context, additive_mask)
        return self.output.LayerNorm(self.output.dense(attended) + hidden)


class Dense(nn.Module):
    def __init__(self, width_in, width_out, with_norm):
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)
        if with_norm:
            self.LayerNorm = nn.LayerNorm(width_out, eps=1e-12)


class BertCrossLayer(nn.Module):  # bert_model.BertCrossLayer
    def __init__(self, width, heads, intermediate):
        super().__init__()
        self.attention = BertAttention(width, heads)
        self.crossattention = BertAttention(width, heads)
        self.intermediate = Dense(width, intermediate, with_norm=False)
        self.output = Dense(intermediate, width, with_norm=True)

    def forward(self, hidden, other, own_mask, other_mask):
        hidden = self.attention(hidden, hidden, own_mask)
        hidden = self.crossattention(hidden, other, other_mask)
        expanded = F.gelu(self.intermediate.dense(hidden))
        return self.output.LayerNorm(self.output.dense(expanded) + hidden)


class Pooler(nn.Module):  # heads.Pooler
    def __init__(self, width):
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class ItmHead(nn.Module):  # heads.ITMHead
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, 2)


class ReferenceMeter(nn.Module):  # meter_module.METERTransformerSS, retrieval fine-tuning
    def __init__(self, config):
        super().__init__()
        from transformers import RobertaConfig, RobertaModel
        hidden = config.hidden_size
        self.vit_model = ClipWithUnusedTextParts(config)
        self.text_transformer = RobertaModel(RobertaConfig(
            vocab_size=config.vocab_size, hidden_size=config.text_width,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            intermediate_size=config.text_intermediate, pad_token_id=config.pad_token_id,
            max_position_embeddings=config.max_position_embeddings, type_vocab_size=1,
            layer_norm_eps=config.text_layer_norm_eps))  # with its pooler, as METER's
        self.cross_modal_text_transform = nn.Linear(config.text_width, hidden)
        self.cross_modal_image_transform = nn.Linear(config.vision_width, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.cross_modal_image_layers = nn.ModuleList(
            BertCrossLayer(hidden, config.fusion_heads, config.fusion_intermediate)
            for _ in range(config.fusion_layers))
        self.cross_modal_text_layers = nn.ModuleList(
            BertCrossLayer(hidden, config.fusion_heads, config.fusion_intermediate)
            for _ in range(config.fusion_layers))
        self.cross_modal_image_pooler = Pooler(hidden)
        self.cross_modal_text_pooler = Pooler(hidden)
        self.itm_score = ItmHead(2 * hidden)
        self.rank_output = nn.Linear(2 * hidden, 1)
        with torch.no_grad():  # fine-tuned: no longer equal to the ITM head's match row
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def forward(self, pixel_values, input_ids, attention_mask):
        text = self.text_transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = self.cross_modal_text_transform(text)
        image = self.cross_modal_image_transform(self.vit_model.visual(pixel_values))
        text = text + self.token_type_embeddings(torch.zeros_like(attention_mask))
        image = image + self.token_type_embeddings(
            torch.ones(image.shape[:2], dtype=torch.long))
        text_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # HF 4.x extended mask
        x, y = text, image
        for text_layer, image_layer in zip(self.cross_modal_text_layers,
                                           self.cross_modal_image_layers):
            x, y = text_layer(x, y, text_mask, None), image_layer(y, x, None, text_mask)
        cls_feats = torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], -1)
        return self.rank_output(cls_feats)[:, 0]


def meter_checkpoint_state(reference):
    state = dict(reference.state_dict())
    # transformers 4.x (which METER used) saved this buffer; later versions recompute it.
    length = reference.text_transformer.config.max_position_embeddings
    state["text_transformer.embeddings.position_ids"] = torch.arange(length)[None]
    return state


@pytest.fixture(scope="module")
def reference(tiny_teacher):
    torch.manual_seed(1)
    return ReferenceMeter(tiny_teacher.meter_config).eval()


def save_lightning_checkpoint(path, state):
    torch.save({"epoch": 9, "global_step": 1234, "pytorch-lightning_version": "1.3.2",
                "state_dict": state, "hyper_parameters": {"config": {"vit": "ViT-B/16"}}}, path)


# ----------------------------------------------------------------------------------------------------

def test_official_checkpoint_loads_strictly_and_matches_reference(tiny_teacher, reference, tokenizer_dir,
                                                                  tmp_path):
    state = meter_checkpoint_state(reference)
    for name in ("vit_model.visual.transformer.resblocks.1.attn.in_proj_weight",
                 "cross_modal_text_layers.1.crossattention.output.LayerNorm.bias",
                 "cross_modal_image_pooler.dense.weight", "itm_score.fc.weight", "rank_output.weight",
                 "token_type_embeddings.weight", "text_transformer.pooler.dense.weight",
                 "vit_model.ln_final.weight"):
        assert name in state  # the reference really carries METER's names
    assert state["rank_output.weight"].shape == (1, 2 * reference.token_type_embeddings.weight.shape[1])
    path = tmp_path / "meter_tiny_irtr.ckpt"
    save_lightning_checkpoint(path, state)

    teacher = MeterTeacher(tiny_teacher.meter_config, tiny_teacher.tokenizer).eval()
    result = teacher.load_state_dict(load_meter_checkpoint(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    pixels = teacher.preprocess_images(images(3))
    tokens = teacher.tokenize(CAPTIONS[:3])
    assert tokens["attention_mask"].min() == 0  # padding is exercised
    with torch.no_grad():
        expected = reference(pixels, tokens["input_ids"], tokens["attention_mask"])
        got = teacher(pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # The same checkpoint through the builder entry point.
    built = build_meter_teacher(f"meter-tiny:{path}", tokenizer_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(built(pixels, **tokens), expected, rtol=1e-4, atol=1e-5)

    # Sizes read back from the weights; head counts and the padding id, which weights cannot show,
    # come from the base preset.
    tiny = tiny_teacher.meter_config
    inferred = meter_config_from_state_dict(load_meter_checkpoint(path), base=tiny)
    for name in ("image_size", "patch_size", "vision_width", "vision_layers", "text_width",
                 "text_layers", "vocab_size", "hidden_size", "fusion_layers", "fusion_intermediate",
                 "max_position_embeddings", "text_kind", "pad_token_id", "vision_heads",
                 "fusion_heads"):
        assert getattr(inferred, name) == getattr(tiny, name), name


def test_pretraining_checkpoint_gets_rank_head_from_itm_match_row(reference):
    state = meter_checkpoint_state(reference)
    del state["rank_output.weight"], state["rank_output.bias"]
    state["mlm_score.bias"] = torch.zeros(5)  # pre-training MLM head: known, dropped
    mapped = map_meter_state_dict(state)
    assert not any(key.startswith("mlm") for key in mapped)
    torch.testing.assert_close(mapped["rank_head.weight"], state["itm_score.fc.weight"][1:])
    torch.testing.assert_close(mapped["rank_head.bias"], state["itm_score.fc.bias"][1:])


class NotATensor:
    pass


def test_bad_checkpoints_fail_with_one_line(reference, tmp_path):
    state = meter_checkpoint_state(reference)
    state["vqa_classifier.0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unknown keys.*vqa_classifier"):
        map_meter_state_dict(state)

    pickled = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "callback": NotATensor()}, pickled)
    with pytest.raises(ValueError) as error:
        load_meter_checkpoint(pickled)
    assert "weights_only" in str(error.value) and "\n" not in str(error.value)


def test_new_teacher_rank_head_starts_from_itm_match_row(tiny_teacher):
    torch.testing.assert_close(tiny_teacher.rank_head.weight, tiny_teacher.itm_head.weight[1:])
    assert not any(p.requires_grad for p in tiny_teacher.itm_head.parameters())


def test_forward_backward(tiny_teacher):
    teacher = MeterTeacher(tiny_teacher.meter_config, tiny_teacher.tokenizer).train()
    tokens = teacher.tokenize(CAPTIONS)
    pixels = teacher.preprocess_images(images(4))
    assert pixels.shape == (4, 3, 64, 64) and pixels.dtype == torch.float32
    logits = teacher(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert logits.shape == (4,)
    F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    trained = [teacher.image_tower.clip.embeddings.patch_embedding.weight,
               teacher.text_tower.encoder.embeddings.word_embeddings.weight,
               teacher.image_fusion_layers[0].cross_attention.query.weight,
               teacher.text_fusion_layers[-1].ffn_out.weight, teacher.rank_head.weight]
    for parameter in trained:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert teacher.itm_head.weight.grad is None


def test_pair_indexed_forward_equals_aligned(tiny_teacher):
    pixels = tiny_teacher.preprocess_images(images(2))
    tokens = tiny_teacher.tokenize(CAPTIONS[:3])
    image_index = torch.tensor([0, 1, 1, 0, 1])
    text_index = torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        indexed = tiny_teacher(pixels, tokens["input_ids"], tokens["attention_mask"],
                               image_index=image_index, text_index=text_index)
        aligned = tiny_teacher(pixels[image_index], tokens["input_ids"][text_index],
                               tokens["attention_mask"][text_index])
    torch.testing.assert_close(indexed, aligned, rtol=1e-5, atol=1e-6)
    # Padding must not change a caption's score: the same caption padded longer scores the same.
    lone = tiny_teacher.tokenize(CAPTIONS[3:4])
    with torch.no_grad():
        alone = tiny_teacher(pixels[:1], lone["input_ids"], lone["attention_mask"])
        batched = tiny_teacher(pixels, tokens["input_ids"], tokens["attention_mask"],
                               image_index=torch.tensor([0]), text_index=torch.tensor([0]))
        padded_ids = F.pad(lone["input_ids"], (0, 5), value=tiny_teacher.tokenizer.pad_token_id)
        padded_mask = F.pad(lone["attention_mask"], (0, 5))
        padded = tiny_teacher(pixels[:1], padded_ids, padded_mask)
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-6)
    assert batched.shape == (1,)


def test_save_pretrained_round_trip(tiny_teacher, tmp_path):
    from train.models.presets import load_teacher_folder
    tiny_teacher.save_pretrained(tmp_path / "teacher")
    for loaded in (build_meter_teacher(tmp_path / "teacher"), load_teacher_folder(tmp_path / "teacher")):
        loaded.eval()
        assert loaded.meter_config == tiny_teacher.meter_config
        tokens = loaded.tokenize(CAPTIONS)
        assert torch.equal(tokens["input_ids"], tiny_teacher.tokenize(CAPTIONS)["input_ids"])
        pixels = images(4)
        with torch.no_grad():
            assert torch.equal(loaded(loaded.preprocess_images(pixels), **tokens),
                               tiny_teacher(tiny_teacher.preprocess_images(pixels), **tokens))


def test_published_configuration():
    config = meter_clip16_roberta_config()
    assert (config.image_size, config.patch_size, config.vision_width) == (288, 16, 768)
    assert config.vision_layers == 11  # ViT-B/16's 12 blocks minus the last, as METER builds it
    assert (config.text_kind, config.vocab_size, config.max_position_embeddings) == ("roberta", 50265, 514)
    assert (config.hidden_size, config.fusion_layers, config.fusion_heads) == (768, 6, 12)
    with pytest.raises(ValueError, match="unknown METER teacher spec"):
        build_meter_teacher("meter-huge")
    with pytest.raises(ValueError, match="checkpoint not found"):
        build_meter_teacher("meter-clip16-roberta:/nonexistent/meter.ckpt")


def test_student_from_teacher_embeds_once_and_round_trips(tiny_teacher, tmp_path):
    from train.models.student import DualEncoder
    student = meter_student_from_teacher(tiny_teacher, embed_dim=32).eval()
    assert isinstance(student, DualEncoder)
    assert not any("fusion" in name for name, _ in student.named_parameters())
    pixels = student.preprocess_images(images(3))
    tokens = student.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        image_emb, text_emb = student(pixels, tokens["input_ids"], tokens["attention_mask"])
        # The towers are the teacher's: same features before the new projections.
        torch.testing.assert_close(student.image_tower(pixels), tiny_teacher.image_tower(pixels)[:, 0])
        torch.testing.assert_close(student.text_tower(**tokens),
                                   tiny_teacher.text_tower(**tokens)[:, 0])
    assert image_emb.shape == (3, 32) and text_emb.shape == (3, 32)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    # A gallery is embedded once; scoring is one matrix product.
    assert (text_emb @ image_emb.T).shape == (3, 3)

    student.save_pretrained(tmp_path / "student")
    loaded = DualEncoder.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        reloaded = loaded(loaded.preprocess_images(images(3)), **loaded.tokenize(CAPTIONS[:3]))
    assert torch.equal(reloaded[0], image_emb) and torch.equal(reloaded[1], text_emb)


def test_project_presets_route_to_meter(tokenizer_dir, tiny_teacher, tmp_path):
    from train.models.presets import build_student, build_teacher
    teacher = build_teacher("meter-tiny", tokenizer_dir)
    assert isinstance(teacher, MeterTeacher) and teacher.backend == "meter"
    tiny_teacher.save_pretrained(tmp_path / "saved")
    assert isinstance(build_teacher(str(tmp_path / "saved"), tokenizer_dir), MeterTeacher)
    student = build_student("from-teacher", teacher=teacher)
    assert student.cfg["image_tower"]["kind"] == "meter_image"
