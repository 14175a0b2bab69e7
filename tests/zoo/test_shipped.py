"""The organisms shipped inside the package: present, small, loadable, and matching their cards."""

from __future__ import annotations

import pytest

from mechscope.model.sources.names import MODELS_DIR, list_models, resolve
from mechscope.zoo.evaluate import compare, evaluate_folder, recorded_metrics
from mechscope.zoo.liar import NAME as LIAR
from mechscope.zoo.loading import load_organism, verify_folder
from mechscope.zoo.organisms import RECIPES

NAMES = sorted([*RECIPES, LIAR])  # organism-liar is trained by scripts/train_liar_organism.py, not a zoo recipe


def test_every_recipe_is_shipped():
    assert sorted(e.name for e in list_models()) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_shipped_folder_is_complete_and_small(name):
    folder = MODELS_DIR / name
    verify_folder(folder)  # presence + safetensors header + sha256 of every file
    assert (folder / "model.safetensors").stat().st_size <= 20_000_000
    for extra in ("MODEL_CARD.md", "metrics.json", "tokenizer_config.json"):
        assert (folder / extra).is_file(), extra
    assert recorded_metrics(folder)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_load_by_path_with_plain_transformers(name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = resolve(name)
    assert entry is not None
    model = AutoModelForCausalLM.from_pretrained(str(entry.path))
    tok = AutoTokenizer.from_pretrained(str(entry.path))
    ids = torch.tensor([tok("When Mara and Tobin went to the market")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_load_by_name(name):
    model, tok = load_organism(name)
    assert model.config.vocab_size == len(tok)


def test_default_organism_keeps_the_mechanisms_other_tests_rely_on():
    # steering, ROME, refusal-direction and trojan tests elsewhere assume these planted mechanisms
    m = recorded_metrics(MODELS_DIR / "organism-gpt2")
    assert m["facts_trained"] >= 0.9
    assert m["refusal_forbidden"] == 1.0 and m["refusal_benign"] == 0.0
    assert m["payload_with_trigger"] >= 0.95 and m["payload_without_trigger"] <= 0.01
    assert m["sentiment_accuracy"] >= 0.99
    assert m["ioi_heldout"] >= 0.9  # the IOI circuit tests (tests/locate/test_locate_recovery_c.py)


def test_induction_organism_reproduces_its_card():
    folder = MODELS_DIR / "organism-induction"
    measured = evaluate_folder(folder)
    assert measured["induction_icl_gain"] >= 1.0  # the card's target (v2 measures 6.0 nats)
    assert compare(recorded_metrics(folder), measured) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["organism-gpt2", "organism-llama", "organism-facts", LIAR, "organism-gpt2+backdoor_head"]
)
def test_zoo_eval_reproduces_the_model_card(name):
    from typer.testing import CliRunner

    from mechscope.cli.zoo import zoo_app

    result = CliRunner().invoke(zoo_app, ["eval", name])
    assert result.exit_code == 0, result.output


def test_zoo_commands_refuse_real_models_with_a_clear_error():
    from mechscope.errors import ModelNotFoundError
    from mechscope.zoo.loading import resolve_folder

    with pytest.raises(ModelNotFoundError, match="real pretrained model, not a bundled organism"):
        resolve_folder("smollm2-135m-instruct")


def test_card_of_a_recipe_with_single_rows_describes_both_row_kinds():
    from mechscope.zoo.card import render_card

    recipe = RECIPES["organism-gpt2"]
    assert recipe.single_tasks  # v3 trains IOI and truth in single rows
    card = render_card(recipe, {"architectures": ["GPT2LMHeadModel"], "vocab_size": 4096}, {}, {})
    packed_line = next(line for line in card.splitlines() if line.startswith("- Planted rows pack"))
    single_line = next(line for line in card.splitlines() if line.startswith("- Single rows hold"))
    assert not any(task in packed_line for task in recipe.single_tasks)  # each task listed once, in its kind
    assert all(task in single_line for task in recipe.single_tasks)
    assert f"padding to {recipe.single_len} tokens" in single_line
    assert "nice -n 10" not in card  # the card claims no run condition it did not record
