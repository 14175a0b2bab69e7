"""Bad input to the model surface (load_model, HookedModel inputs, caching, generation): clear errors naming what
was expected and what came, and the model's parameters unchanged."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from bad_cases import case, check, gpt2, llama

from mechscope.errors import ConfigError, CorruptWeightsError, MechscopeError, ModelNotFoundError, SiteError
from mechscope.model.hooked import ContextLengthWarning
from mechscope.model.loading import load_model
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


LONG = "the " * 100  # > 64 positions (both tiny models' context)
IDS = torch.tensor([[5, 6, 7, 8]])

# Inputs to a loaded model --------------------------------------------------------------------------------
INPUT_CASES = [
    case("empty-ids", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ConfigError, "at least one token", "(1, 0)"),
    case(
        "all-pad-prompt",
        lambda m: m({"input_ids": torch.tensor([[5, 6], [5, 6]]), "attention_mask": torch.tensor([[1, 1], [0, 0]])}),
        ConfigError,
        "prompts [1] have no tokens",
        "at least one token",
    ),
    case("empty-list", lambda m: m([]), ConfigError, "non-empty list of strings", "got list"),
    case("too-long-text", lambda m: m(LONG), ConfigError, "prompt of 103 tokens", "context of 64 positions"),
    case(
        "too-long-ids",
        lambda m: m(torch.ones(1, 65, dtype=torch.long)),
        ConfigError,
        "prompt of 65 tokens",
        "context of 64 positions",
    ),
    case("id-too-large", lambda m: m(torch.tensor([[1, 128]])), ConfigError, "[0, 128)", "from 1 to 128"),
    case("id-negative", lambda m: m(torch.tensor([[-3, 5]])), ConfigError, "[0, 128)", "from -3 to 5"),
    case("float-ids", lambda m: m(torch.ones(1, 3)), ConfigError, "integer token ids", "torch.float32"),
    case("3d-ids", lambda m: m(torch.ones(1, 2, 3, dtype=torch.long)), ConfigError, "[batch, pos]", "(1, 2, 3)"),
    case("none-input", lambda m: m(None), ConfigError, "inputs must be text", "got NoneType"),
    case("int-input", lambda m: m(7), ConfigError, "inputs must be text", "got int"),
    case(
        "mask-shape",
        lambda m: m(
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
        ),
        ConfigError,
        "attention_mask shape (1, 2)",
        "input_ids shape (1, 3)",
    ),
    case("mapping-no-ids", lambda m: m({"ids": IDS}), ConfigError, "needs 'input_ids'", "['ids']"),
    case(
        "stop-at-layer-beyond",
        lambda m: m.run_with_cache(IDS, sites=["hook_embed"], stop_at_layer=5),
        ConfigError,
        "stop_at_layer must be in 0..2",
        "got 5",
    ),
    case(
        "stop-at-layer-negative",
        lambda m: m.run_with_cache(IDS, sites=["hook_embed"], stop_at_layer=-1),
        ConfigError,
        "0..2",
        "got -1",
    ),
    case(
        "site-after-stop",
        lambda m: m.run_with_cache(IDS, sites=["blocks.1.hook_resid_post"], stop_at_layer=1),
        ConfigError,
        "blocks.1.hook_resid_post",
        "stop_at_layer=1",
    ),
    case(
        "cache-position-out-of-range",
        lambda m: m.run_with_cache(IDS, sites=["hook_embed"], positions=[0, 9]),
        ConfigError,
        "positions [9]",
        "[-4, 4)",
    ),
    case(
        "cache-position-float",
        lambda m: m.run_with_cache(IDS, sites=["hook_embed"], positions=[0.5]),
        ConfigError,
        "integer indices",
        "[0.5]",
    ),
    case(
        "cache-bad-device",
        lambda m: m.run_with_cache(IDS, sites=["hook_embed"], device="gpu9"),
        ConfigError,
        "torch device",
        "'gpu9'",
    ),
    case(
        "unknown-site",
        lambda m: m.run_with_cache(IDS, sites=["blocks.0.hook_resid_psot"]),
        SiteError,
        "'blocks.0.hook_resid_psot'",
        "'blocks.0.hook_resid_post'",
    ),
    case(
        "layer-beyond-model",
        lambda m: m.run_with_cache(IDS, sites=["blocks.7.hook_resid_post"]),
        SiteError,
        "'blocks.7.hook_resid_post'",
        "layers 0..1",
    ),
    case("site-not-a-name", lambda m: m.site(3), SiteError, "canonical name", "got int"),
    case("generate-zero-tokens", lambda m: m.generate("a b", max_new_tokens=0), ConfigError, "positive", "got 0"),
    case("generate-negative-tokens", lambda m: m.generate("a b", max_new_tokens=-2), ConfigError, "positive", "got -2"),
    case(
        "generate-past-context",
        lambda m: m.generate("the " * 30, max_new_tokens=40),
        ConfigError,
        "max_new_tokens=40",
        "context of 64",
    ),
    case("generate-too-long-prompt", lambda m: m.generate(LONG, max_new_tokens=1), ConfigError, "context of 64"),
    case("single-token-of-many", lambda m: m.to_single_token("the cat sat"), ConfigError, "single token", "6 tokens"),
    case("single-token-of-empty", lambda m: m.to_single_token(""), ConfigError, "single token", "0 tokens"),
    case("to-string-bad-id", lambda m: m.to_string([5, 10**6]), ConfigError, "[0, 128)", "[1000000]"),
    case(
        "padding-side", lambda m: m.to_tokens(["a", "b c"], padding_side="up"), ConfigError, "'left' or 'right'", "'up'"
    ),
    case(
        "loss-not-scalar",
        lambda m: m.run_with_grads(IDS, lambda lg: lg.sum(-1), ["blocks.0.hook_resid_post"]),
        ConfigError,
        "scalar tensor",
        "(1, 4)",
    ),
    case("hooks-not-mapping", lambda m: m.hooks([1]).__enter__(), ConfigError, "mapping {site: fn}", "got list"),
    case(
        "hook-not-callable",
        lambda m: m.hooks({"blocks.0.hook_attn_out": 3}).__enter__(),
        ConfigError,
        "must be callable",
        "got int",
    ),
]


@pytest.mark.parametrize("bad", INPUT_CASES)
def test_bad_inputs_to_a_model(bad):
    check(bad, gpt2(), model=gpt2())
    assert gpt2()._sessions == []


def test_a_rotary_model_warns_past_its_trained_length():
    model = llama()
    before = torch.get_rng_state()
    with pytest.warns(ContextLengthWarning, match=r"prompt of 103 tokens runs past the 64 positions"):
        model(LONG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model("the cat")  # inside the context: silent
    assert torch.equal(before, torch.get_rng_state())


# Loading --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    hf, tok = tiny_model("gpt2")
    folder = tmp_path_factory.mktemp("load") / "good"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _variant(good, tmp_path, change):
    folder = tmp_path / "variant"
    shutil.copytree(good, folder)
    change(folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _checksummed_then_flipped(folder):
    from mechscope.model.sources.checksums import write_checksums

    write_checksums(folder)
    _flip_byte(folder / "model.safetensors")


def _pickle_only(folder):
    state = torch.nn.Module().state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


LOAD_CASES = [
    case("unknown-name", lambda g, t: load_model("no-such-model"), ModelNotFoundError, "'no-such-model'", "bundled:"),
    case("absent-folder", lambda g, t: load_model(t / "absent"), ModelNotFoundError, "absent", "save_pretrained"),
    case(
        "empty-folder",
        lambda g, t: load_model(_variant(g, t, lambda f: [p.unlink() for p in f.iterdir()])),
        ModelNotFoundError,
        "neither config.json nor weights",
        "found []",
    ),
    case(
        "a-file-not-a-folder",
        lambda g, t: load_model(g / "config.json"),
        ModelNotFoundError,
        "is a file",
        "expected a folder",
    ),
    case(
        "config-without-weights",
        lambda g, t: load_model(_variant(g, t, lambda f: (f / "model.safetensors").unlink())),
        ModelNotFoundError,
        "has config.json but no weights",
        "model.safetensors",
    ),
    case(
        "malformed-config-json",
        lambda g, t: load_model(_variant(g, t, lambda f: (f / "config.json").write_text("{oops"))),
        ModelNotFoundError,
        "config.json",
        "not a valid JSON file",
    ),
    case(
        "non-utf8-config",
        lambda g, t: load_model(
            _variant(g, t, lambda f: (f / "config.json").write_bytes(b'{"model_type": "gpt\xe9"}'))
        ),
        ModelNotFoundError,
        "config.json",
        "not a valid JSON file",
    ),
    case(
        "unknown-architecture",
        lambda g, t: load_model(_variant(g, t, lambda f: _edit_config(f, model_type="nosuch"))),
        ModelNotFoundError,
        "cannot read an HF config",
        "`nosuch`",
    ),
    case(
        "truncated-weights",
        lambda g, t: load_model(
            _variant(
                g, t, lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500])
            )
        ),
        MechscopeError,
        "could not load the weights",
        "SafetensorError",
    ),
    case(
        "empty-weights-file",
        lambda g, t: load_model(_variant(g, t, lambda f: (f / "model.safetensors").write_bytes(b""))),
        MechscopeError,
        "could not load the weights",
        "header too small",
    ),
    case(
        "bit-flip-against-checksums",
        lambda g, t: load_model(_variant(g, t, _checksummed_then_flipped)),
        CorruptWeightsError,
        "expected sha256",
        "got ",
    ),
    case(
        "checksum-entry-outside-folder",
        lambda g, t: load_model(
            _variant(
                g,
                t,
                lambda f: (f / "checksums.json").write_text(
                    json.dumps({"schema_version": 1, "sha256": {"../good/config.json": "0" * 64}})
                ),
            )
        ),
        CorruptWeightsError,
        "'../good/config.json'",
        "checksums.json",
    ),
    case(
        "pickle-only-weights",
        lambda g, t: load_model(_variant(g, t, _pickle_only)),
        ConfigError,
        "pickle-based weights (pytorch_model.bin)",
        "allow_pickle=True",
    ),
    case(
        "bad-dtype",
        lambda g, t: load_model(g, dtype="float13"),
        ConfigError,
        "dtype must be a torch.dtype or one of",
        "'float13'",
    ),
    case(
        "not-a-gguf",
        lambda g, t: load_model(_variant(g, t, lambda f: (f / "x.gguf").write_bytes(b"PK")) / "x.gguf"),
        MechscopeError,
        "x.gguf",
    ),
]


@pytest.mark.parametrize("bad", LOAD_CASES)
def test_bad_model_sources(bad, good, tmp_path):
    from bad_cases import folder_hash

    before = folder_hash(good)
    check(bad, good, tmp_path)
    assert folder_hash(good) == before
