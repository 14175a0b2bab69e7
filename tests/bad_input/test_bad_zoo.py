"""Bad input to the zoo (organism names and folders, damaged organisms, training, corpus and tokenizer commands):
clear errors with exit code 2 and no traceback on the command line, and neither the bundled organisms nor the
inputs changed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from bad_cases import case, check, check_cli, folder_hash

import mechscope.zoo
from mechscope.errors import ConfigError, CorruptWeightsError, ModelNotFoundError
from mechscope.model.loading import load_model
from mechscope.zoo.loading import load_organism
from mechscope.zoo.train import TrainOptions

pytestmark = pytest.mark.usefixtures("single_thread")

BUNDLED = Path(mechscope.zoo.__file__).parent / "models"
GPT2 = BUNDLED / "organism-gpt2"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Copies of organism-gpt2 damaged in one way each."""
    root = tmp_path_factory.mktemp("organisms")

    def copy(name: str) -> Path:
        folder = root / name
        shutil.copytree(GPT2, folder)
        return folder

    flip = copy("flip")
    data = bytearray((flip / "model.safetensors").read_bytes())
    data[-5] ^= 1
    (flip / "model.safetensors").write_bytes(bytes(data))
    outside = copy("outside")
    sums = json.loads((outside / "checksums.json").read_text())
    sums["sha256"]["../flip/config.json"] = "0" * 64
    (outside / "checksums.json").write_text(json.dumps(sums))
    missing = copy("missing")
    (missing / "tokenizer.json").unlink()
    malformed = copy("malformed")
    (malformed / "checksums.json").write_text("{not json")
    truncated = copy("truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    (root / "empty").mkdir()
    return root


API_CASES = [
    case(
        "unknown-organism",
        lambda d: load_organism("organism-nope"),
        ModelNotFoundError,
        "'organism-nope'",
        "organism-gpt2",
    ),
    case("absent-folder", lambda d: load_organism(d / "absent"), ModelNotFoundError, "absent", "bundled"),
    case("empty-folder", lambda d: load_model(d / "empty"), ModelNotFoundError, "neither config.json nor weights"),
    case("bit-flip", lambda d: load_organism(d / "flip"), CorruptWeightsError, "expected sha256", "got "),
    case("bit-flip-via-load-model", lambda d: load_model(d / "flip"), CorruptWeightsError, "model.safetensors"),
    case(
        "checksum-entry-outside",
        lambda d: load_organism(d / "outside"),
        CorruptWeightsError,
        "'../flip/config.json'",
        "inside",
    ),
    case(
        "listed-file-missing", lambda d: load_organism(d / "missing"), ModelNotFoundError, "tokenizer.json", "missing"
    ),
    case("malformed-checksums", lambda d: load_organism(d / "malformed"), CorruptWeightsError, "checksums.json"),
    case(
        "truncated-weights", lambda d: load_organism(d / "truncated"), CorruptWeightsError, "(1000 bytes)", "unreadable"
    ),
    case("unknown-variant", lambda d: load_model("organism-gpt2+nope"), ModelNotFoundError, "'organism-gpt2+nope'"),
    case(
        "train-steps-zero",
        lambda d: TrainOptions(corpus=d, run_dir=d, tokenizer_dir=d, steps=0),
        ConfigError,
        "steps must be a positive integer",
        "0",
    ),
    case(
        "train-steps-negative",
        lambda d: TrainOptions(corpus=d, run_dir=d, tokenizer_dir=d, steps=-1),
        ConfigError,
        "steps must be a positive integer",
        "-1",
    ),
    case(
        "train-threads",
        lambda d: TrainOptions(corpus=d, run_dir=d, tokenizer_dir=d, threads=-2),
        ConfigError,
        "threads must be a positive integer",
        "-2",
    ),
    case(
        "train-steps-float",
        lambda d: TrainOptions(corpus=d, run_dir=d, tokenizer_dir=d, steps=math.inf),
        ConfigError,
        "steps must be a positive integer",
    ),
]


@pytest.mark.parametrize("bad", API_CASES)
def test_bad_organism_inputs(bad, damaged):
    before = folder_hash(GPT2)
    check(bad, damaged)
    assert folder_hash(GPT2) == before


def _dirs(tmp: Path) -> dict[str, Path]:
    latin = tmp / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes(b"caf\xe9 au lait, a long enough paragraph of text\n")
    (tmp / "empty").mkdir()
    return {"t": tmp, "latin": latin, "empty": tmp / "empty"}


CLI_CASES = [
    (["zoo", "eval", "{t}/absent"], ["expected a bundled model name or a model folder", "absent"]),
    (["zoo", "eval", "organism-nope"], ["'organism-nope'", "Did you mean 'organism-gpt2'"]),
    (["zoo", "eval", "{d}/flip"], ["expected sha256", "from checksums.json"]),
    (["zoo", "eval", "{d}/outside"], ["'../flip/config.json'"]),
    (["zoo", "eval", "{d}/truncated"], ["model.safetensors (1000 bytes)", "expected a valid safetensors file"]),
    (["zoo", "card", "organism-nope"], ["'organism-nope'", "bundled"]),
    (["zoo", "train", "nope-recipe", "--out", "{t}/o"], ["unknown organism 'nope-recipe'", "organism-induction"]),
    (["zoo", "train", "organism-induction", "--steps", "0", "--out", "{t}/o"], ["steps must be a positive integer"]),
    (["zoo", "train", "organism-induction", "--steps", "-1", "--out", "{t}/o"], ["steps must be a positive integer"]),
    (["zoo", "train", "organism-induction", "--threads", "0", "--out", "{t}/o"], ["threads must be a positive", "0"]),
    (
        ["zoo", "train", "organism-induction", "--corpus", "{t}/absent", "--steps", "1", "--out", "{t}/o"],
        ["expected a corpus manifest", "zoo corpus"],
    ),
    (["zoo", "corpus", "--out", "{t}/c"], ["--text-dir", "--fetch-debian"]),
    (["zoo", "corpus", "--text-dir", "{t}/absent", "--out", "{t}/c"], ["expected a folder of *.txt files", "absent"]),
    (["zoo", "corpus", "--text-dir", "{empty}", "--out", "{t}/c"], ["expected *.txt files", "found none"]),
    (["zoo", "corpus", "--text-dir", "{latin}", "--out", "{t}/c"], ["a.txt", "not UTF-8 text", "byte 3"]),
    (["zoo", "tokenizer", "--corpus", "{t}/absent", "--out", "{t}/tok"], ["expected a corpus manifest"]),
    (["zoo", "build-variants", "organism-gpt2+nope"], ["unknown variant 'organism-gpt2+nope'", "shipped"]),
]


@pytest.mark.parametrize(
    "args,needles", CLI_CASES, ids=[" ".join(a[:3]) + f"-{i}" for i, (a, _) in enumerate(CLI_CASES)]
)
def test_bad_zoo_commands(args, needles, damaged, tmp_path):
    where = {**_dirs(tmp_path), "d": damaged}
    check_cli([a.format(**where) for a in args], needles, folders=[GPT2, damaged / "flip"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists() and not (tmp_path / "tok").exists()
