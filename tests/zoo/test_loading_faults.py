"""Faults around organism folders: a killed save leaves the old or the new folder, never a mix; checksum files
cannot reach outside their folder; temporary files are never listed."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.errors import CorruptWeightsError
from mechscope.model.sources.checksums import CHECKSUMS, verify_checksums, write_checksums
from mechscope.zoo import loading
from mechscope.zoo.loading import save_organism, verify_folder
from mechscope.zoo.tokenizer import load_tokenizer


def _tiny(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = load_tokenizer()
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, n_positions=32)), tok


@pytest.mark.parametrize("fail_at", ["tokenizer", "checksums", "swap"])
def test_a_save_killed_at_any_point_leaves_the_old_folder_whole(tmp_path, monkeypatch, fail_at):
    old_model, tok = _tiny(0)
    folder = tmp_path / "org"
    save_organism(old_model, tok, folder, {"metrics.json": {"v": 1}})
    (folder / "NOTES.md").write_text("hand-written notes\n")
    write_checksums(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    new_model, _ = _tiny(1)

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("killed")

    target = {
        "tokenizer": (type(tok), "save_pretrained"),
        "checksums": (loading, "write_checksums"),
        "swap": (loading, "_swap_in"),
    }[fail_at]
    monkeypatch.setattr(*target, crash)
    with pytest.raises(KeyboardInterrupt):
        save_organism(new_model, tok, folder, {"metrics.json": {"v": 2}})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["org"]  # no staging folder left behind
    verify_folder(folder)


def test_a_completed_save_replaces_the_folder_and_keeps_hand_written_files(tmp_path):
    model, tok = _tiny(0)
    folder = tmp_path / "org"
    save_organism(model, tok, folder, {"metrics.json": {"v": 1}})
    (folder / "NOTES.md").write_text("notes\n")
    new_model, _ = _tiny(1)
    save_organism(new_model, tok, folder, {"metrics.json": {"v": 2}})
    assert json.loads((folder / "metrics.json").read_text()) == {"v": 2}
    assert (folder / "NOTES.md").read_text() == "notes\n"
    assert "NOTES.md" in json.loads((folder / CHECKSUMS).read_text())["sha256"]
    verify_folder(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["org"]


def test_checksum_lists_name_only_files_inside_their_folder(tmp_path):
    folder = tmp_path / "org"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    (folder / ".a.txt.123.tmp").write_text("left by a killed writer")
    sums = write_checksums(folder)
    assert list(sums) == ["a.txt"]
    assert verify_checksums(folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    for name in ("../secret.txt", str(secret), "sub/a.txt", ".."):
        (folder / CHECKSUMS).write_text(json.dumps({"schema_version": 1, "sha256": {name: "0" * 64}}))
        with pytest.raises(CorruptWeightsError, match="directly inside"):
            verify_checksums(folder)
    (folder / CHECKSUMS).write_text("{not json")
    with pytest.raises(CorruptWeightsError, match="malformed checksum list"):
        verify_checksums(folder)


def test_load_model_verifies_a_folder_that_lists_checksums(tmp_path):
    """A bit-flipped organism loaded silently (with an unchanged fingerprint) before load_model verified."""
    import mechscope as ms

    model, tok = _tiny(0)
    folder = tmp_path / "org"
    save_organism(model, tok, folder)
    ms.load_model(folder)  # intact: loads
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit inside the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError, match=r"model\.safetensors: expected sha256"):
        ms.load_model(folder)


def test_pickle_weights_load_only_when_asked(tmp_path):
    import mechscope as ms
    from mechscope.errors import ConfigError

    model, tok = _tiny(0)
    folder = tmp_path / "bin-only"
    folder.mkdir()
    model.config.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what older tools wrote
    tok.save_pretrained(str(folder))
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))
    with pytest.raises(ConfigError, match="pickle-based weights"):
        ms.load_model(folder)
    loaded = ms.load_model(folder, allow_pickle=True)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded.forward(ids), model.eval()(ids).logits)
