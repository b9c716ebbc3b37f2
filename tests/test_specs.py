"""One grammar for --teacher / --student (train/models/presets.py's parse_spec): every spec form goes
through preflight (python -m train.preflight) and the builder, and both agree: built, or the same
one-line error. Before, `scene-oracle:SHARDS` was refused by preflight and accepted by run.py, and a
bare PATH.ckpt accepted by preflight and refused by the builder."""
import pytest

from tests.fixtures import clip_folder, make_synthetic_shards, vtde_folder
from tests.test_models import tiny_vilt_config
from train.models.presets import build_student, build_teacher, parse_spec


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Every kind of thing a spec can name, made once: shards, saved folders, transformers folders."""
    from transformers import AutoTokenizer, ViltForImageAndTextRetrieval
    root = tmp_path_factory.mktemp("specs")
    shards = make_synthetic_shards(root / "shards", train=16, val=8, maxcount=8, tokenizer=True, image_size=32)
    words = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    build_teacher("film-tiny", shards / "tokenizer").save_pretrained(root / "film")
    build_student("student-tiny", shards / "tokenizer").save_pretrained(root / "student")
    for name, with_tokenizer in (("vilt", True), ("vilt-bare", False)):
        ViltForImageAndTextRetrieval(tiny_vilt_config(len(words))).save_pretrained(str(root / name))
        if with_tokenizer:
            words.save_pretrained(str(root / name))
    clip_folder(words, root / "clip")
    vtde_folder(words, root / "vtde")
    (root / "meter.ckpt").write_bytes(b"not read: the tokenizer check comes first")
    (root / "a-file").write_text("x")
    (root / "empty").mkdir()
    return root


# (role, spec with {root} for the fixture folder, extra flags, expected form or error text)
CASES = [
    ("teacher", "film-tiny", [], "preset"),
    ("teacher", "vilt-tiny", [], "preset"),
    ("teacher", "meter-tiny", [], "meter"),
    ("teacher", "meter-huge", [], "unknown METER preset 'meter-huge'"),
    ("teacher", "meter-clip16-roberta", [], "give --tokenizer FOLDER"),
    ("teacher", "{root}/meter.ckpt", [], "give --tokenizer FOLDER"),            # bare PATH.ckpt
    ("teacher", "meter-tiny:{root}/missing.ckpt", [], "checkpoint {root}/missing.ckpt not found"),
    ("teacher", "scene-oracle:{root}/shards", [], "scene-oracle"),
    ("teacher", "scene-oracle:{root}/nowhere", [], "is not a folder"),
    ("teacher", "{root}/film", [], "project-folder"),
    ("teacher", "{root}/student", [], "a saved student folder, not a teacher"),
    ("teacher", "{root}/vilt", [], "hf-folder"),
    ("teacher", "{root}/vilt-bare", [], "has no tokenizer files"),
    ("teacher", "{root}/vilt-bare", ["--tokenizer", "{root}/shards/tokenizer"], "hf-folder"),
    ("teacher", "{root}/clip", [], "model_type 'clip'"),
    ("teacher", "{root}/empty", [], "without config.json"),
    ("teacher", "{root}/a-file", [], "a file, not a model folder"),
    ("teacher", "film-giant", [], "unknown teacher spec 'film-giant'"),
    ("teacher", "some-org/some-model", [], "as a hub id"),
    ("student", "student-tiny", [], "preset"),
    ("student", "{root}/student", [], "project-folder"),
    ("student", "{root}/film", [], "a saved 'film' teacher folder, not a student"),
    ("student", "{root}/clip", [], "hf-folder"),
    ("student", "{root}/vtde", [], "hf-folder"),
    ("student", "{root}/vilt", [], "model_type 'vilt'"),
    ("student", "student-huge", [], "unknown student spec 'student-huge'"),
    ("student", "some-org/some-model", [], "as a hub id"),
]


def preflight_line(capsys, role, spec, flags, shards):
    from train import preflight
    stage = "teacher" if role == "teacher" else "student"
    code = preflight.main(["--ranks", "1", "--stage", stage, "--shards", str(shards), "--batch-size", "4",
                           f"--{role}", spec, *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, lines


def build(role, spec, flags, shards):
    tokenizer = flags[1] if flags else None
    if role == "teacher":
        return build_teacher(spec, shards / "tokenizer", tokenizer=tokenizer)
    return build_student(spec, shards / "tokenizer", tokenizer=tokenizer)


@pytest.mark.parametrize("role, spec, flags, expected", CASES)
def test_every_spec_form_through_preflight_and_builder(role, spec, flags, expected, places, capsys):
    spec = spec.format(root=places)
    flags = [flag.format(root=places) for flag in flags]
    expected = expected.format(root=places)
    shards = places / "shards"
    code, lines = preflight_line(capsys, role, spec, flags, shards)
    forms = ("preset", "meter", "scene-oracle", "project-folder", "hf-folder")
    if expected in forms:
        assert code == 0 and lines == [], lines
        assert parse_spec(spec, role).form == expected
        assert build(role, spec, flags, shards) is not None
    else:
        assert code == 2 and len(lines) == 1 and expected in lines[0], lines
        with pytest.raises(ValueError, match=None) as error:
            build(role, spec, flags, shards)
        assert expected in str(error.value) and "\n" not in str(error.value)
