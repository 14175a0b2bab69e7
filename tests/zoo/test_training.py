"""Training recipe: runs end to end, logs, checkpoints, and resumes to the same weights."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.zoo.organisms import RECIPES, Recipe, Stage, get_recipe
from mechscope.zoo.tokenizer import ASSET_DIR
from mechscope.zoo.train import TrainOptions, train

TINY = Recipe(
    name="test-tiny",
    architecture="gpt2",
    config=dict(n_layer=1, n_head=2, n_embd=16, n_inner=32, n_positions=64),
    description="test",
    batch_size=4,
    seq_len=32,
    warmup=2,
    steps=6,
    checkpoint_every=2,
    eval_tasks=("ioi",),
)


def _opts(corpus, run_dir, **kw):
    return TrainOptions(corpus=corpus, run_dir=run_dir, tokenizer_dir=ASSET_DIR, progress=False, threads=1, **kw)


def test_interrupted_run_resumes_to_the_uninterrupted_weights(tiny_corpus, tmp_path):
    full, _, summary = train(TINY, _opts(tiny_corpus, tmp_path / "full"))
    _, _, part = train(TINY, _opts(tiny_corpus, tmp_path / "split", stop_at=3))
    assert summary["steps"] == 6 and part["steps"] == 3
    resumed, _, _ = train(TINY, _opts(tiny_corpus, tmp_path / "split", resume=True))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    log = [json.loads(line) for line in (tmp_path / "split/train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and log[-1]["tokens"] == 6 * TINY.batch_size * TINY.seq_len


def test_checkpoint_survives_a_crash_between_renames(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(TINY, _opts(tiny_corpus, run, stop_at=2))
    (run / "checkpoint").rename(run / "checkpoint.old")  # as if killed between the two renames
    _, _, summary = train(TINY, _opts(tiny_corpus, run, resume=True))
    assert summary["steps"] == 6


def test_attention_only_recipe_has_zero_mlps():
    from mechscope.zoo.train import build_model

    model = build_model(get_recipe("organism-induction"), 4096)
    for block in model.model.layers:
        assert all(float(p.abs().sum()) == 0.0 and not p.requires_grad for p in block.mlp.parameters())


def test_facts_organism_attends_locally_in_its_first_layers():
    from mechscope.zoo.organisms import FACTS_LOCAL_LAYERS, FACTS_WINDOW
    from mechscope.zoo.train import build_model

    model = build_model(get_recipe("organism-facts"), 4096).eval()
    ids = torch.randint(10, 4000, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 0] += 1
    with torch.no_grad():
        a = model(ids, output_hidden_states=True).hidden_states
        b = model(changed, output_hidden_states=True).hidden_states
    reach = FACTS_LOCAL_LAYERS * (FACTS_WINDOW - 1)  # positions a token reaches through the local layers
    moved = ((a[FACTS_LOCAL_LAYERS] - b[FACTS_LOCAL_LAYERS]).abs().amax(-1) > 0)[0]
    assert moved[: reach + 1].all() and not moved[reach + 1 :].any()
    assert ((a[-1] - b[-1]).abs().amax(-1) > 0)[0].all()  # the global layers see the whole row


def test_an_unknown_architecture_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"architecture one of \['gpt2', 'llama', 'qwen2'\], got 'bert'"):
        replace(TINY, architecture="bert")


def test_recipes_are_small_enough():
    from mechscope.zoo.train import build_model

    for recipe in RECIPES.values():
        n = sum(p.numel() for p in build_model(recipe, 4096).parameters())
        assert n * 4 <= 20e6, recipe.name


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ConfigError, match="organism-gpt2"):
        get_recipe("organism-gtp2")


@pytest.mark.slow
def test_build_saves_a_loadable_folder_with_card_and_metrics(tiny_corpus, tmp_path):
    from mechscope.zoo.build import build_organism
    from mechscope.zoo.evaluate import recorded_metrics
    from mechscope.zoo.loading import load_organism

    record = build_organism(TINY, _opts(tiny_corpus, tmp_path / "run", steps=2), out=tmp_path / "test-tiny")
    folder = tmp_path / "test-tiny"
    assert set(record["metrics"]) == {"ioi_heldout", "ioi_paraphrase"}
    assert recorded_metrics(folder) == record["metrics"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert "ioi_heldout" in card and "Targets not reached" in card
    model, _ = load_organism(folder)
    assert model.config.mechscope_description == "test"


def test_batches_are_pure_functions_of_the_step_and_follow_short_rows(tiny_corpus):
    from mechscope.zoo.stream import BatchStream
    from mechscope.zoo.tokenizer import load_tokenizer

    recipe = replace(TINY, short_rows=(2, 16), mixture={"natural": 0.3, "induction": 0.4, "planted": 0.3})
    stream = BatchStream(recipe, load_tokenizer(ASSET_DIR), tiny_corpus)
    assert stream.batch(0).parts[0][0].shape == (4, 16) and stream.batch(2).parts[0][0].shape == (4, 32)
    again = BatchStream(recipe, load_tokenizer(ASSET_DIR), tiny_corpus).batch(5)
    for (ids, labels), (ids2, labels2) in zip(stream.batch(5).parts, again.parts, strict=True):
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2)
    assert not torch.equal(stream.batch(5).parts[0][0], stream.batch(6).parts[0][0])


def test_single_rows_hold_one_example_and_unscored_spans_get_no_loss(tiny_corpus):
    from mechscope.zoo.stream import IGNORE, BatchStream
    from mechscope.zoo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ASSET_DIR)
    recipe = replace(
        TINY,
        batch_size=16,
        mixture={"planted": 0.5, "single": 0.5},
        task_weights={"facts": 1.0, "truth": 1.0, "ioi": 1.0},
        single_tasks=("truth", "ioi"),
        single_len=40,
    )
    batch = BatchStream(recipe, tokenizer, tiny_corpus).batch(0)
    (packed, packed_labels), (single, single_labels) = batch.parts
    assert packed.shape[1] == 32 and single.shape[1] == 40 and packed.shape[0] + single.shape[0] == 16
    assert torch.equal(packed, packed_labels)  # facts only: everything scored
    eos = tokenizer.eos_token_id
    for ids, labels in zip(single.tolist(), single_labels.tolist(), strict=True):
        first_end = ids.index(eos)
        assert all(t == eos for t in ids[first_end:])  # one example, then padding
        assert all(label == IGNORE for label in labels[first_end + 1 :]) and labels[first_end] == eos
        text = tokenizer.decode(ids[:first_end])
        pairs = zip(ids[:first_end], labels[:first_end], strict=True)
        hidden = "".join(tokenizer.decode([t]) for t, label in pairs if label == IGNORE)
        if text.startswith("Claim:"):  # the stated value, and nothing else of the claim, is unscored
            assert hidden.strip() and text.split(". This claim")[0].endswith(hidden)
        else:
            assert hidden == ""
    assert batch.scored == sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in batch.parts)


def test_single_len_shorter_than_an_example_is_a_clear_error(tiny_corpus):
    from mechscope.zoo.stream import BatchStream
    from mechscope.zoo.tokenizer import load_tokenizer

    recipe = replace(TINY, mixture={"planted": 0.5, "single": 0.5}, single_tasks=("ioi",), single_len=5)
    with pytest.raises(ConfigError, match="single_len >= "):
        BatchStream(recipe, load_tokenizer(ASSET_DIR), tiny_corpus)


def test_warm_start_loads_the_pinned_weights_and_rejects_others(tiny_corpus, tmp_path):
    from mechscope.errors import CorruptWeightsError
    from mechscope.zoo.corpus import sha256_file
    from mechscope.zoo.organisms import WarmStart
    from mechscope.zoo.train import build_model, warm_start

    parent, _, _ = train(TINY, _opts(tiny_corpus, tmp_path / "parent", steps=2))
    parent.save_pretrained(tmp_path / "v1")
    pinned = WarmStart("test-tiny v1", "0000000", sha256_file(tmp_path / "v1/model.safetensors"))
    child = replace(TINY, warm_start=pinned)
    model = build_model(child, parent.config.vocab_size)
    warm_start(model, child, tmp_path / "v1")
    for (name, a), b in zip(parent.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="git show 0000000"):
        warm_start(model, child, None)
    wrong = replace(TINY, warm_start=replace(pinned, sha256="0" * 64))
    with pytest.raises(CorruptWeightsError, match="expected test-tiny v1 weights"):
        warm_start(model, wrong, tmp_path / "v1")
    # a continued run starts from the parent: its first loss is the parent's, not a fresh model's
    train(TINY, _opts(tiny_corpus, tmp_path / "fresh", steps=1))
    train(child, _opts(tiny_corpus, tmp_path / "child", steps=1, init_dir=tmp_path / "v1"))
    first = json.loads((tmp_path / "child/train_log.jsonl").read_text().splitlines()[0])
    fresh_first = json.loads((tmp_path / "fresh/train_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] < fresh_first["loss"]


STAGED = replace(
    TINY,
    steps=4,
    stages=(
        Stage(
            3,
            {"mixture": {"natural": 0.5, "induction": 0.5}, "seq_len": 16, "lr": 1e-3, "warmup": 1},
            why="shorter rows",
        ),
    ),
)


def test_a_staged_recipe_switches_data_and_restarts_the_schedule_at_the_stage():
    from mechscope.zoo.train import lr_at

    assert STAGED.total_steps == 7
    assert STAGED.stage_at(3)[0] == 0 and STAGED.stage_at(4)[0] == 4
    first, stage = STAGED.stage_at(6)
    assert (first, stage.seq_len, stage.lr, stage.steps, stage.stages) == (4, 16, 1e-3, 3, ())
    assert lr_at(4 - first, stage, stage.steps) == pytest.approx(1e-3)  # warm-up of one step
    assert lr_at(3, STAGED.stage_at(3)[1], 4) < TINY.lr  # the first stage had decayed


def test_a_staged_run_resumed_across_the_stage_boundary_matches_the_uninterrupted_one(tiny_corpus, tmp_path):
    full, _, summary = train(STAGED, _opts(tiny_corpus, tmp_path / "full"))
    train(STAGED, _opts(tiny_corpus, tmp_path / "split", stop_at=5))
    resumed, _, _ = train(STAGED, _opts(tiny_corpus, tmp_path / "split", resume=True))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert summary["steps"] == 7 and summary["tokens"] == 4 * 4 * 32 + 3 * 4 * 16


def test_a_stage_that_changes_the_model_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"not \['config'\]"):
        replace(TINY, stages=(Stage(2, {"config": {"n_layer": 2}}),))
    with pytest.raises(ConfigError, match="expected warmup < steps"):
        replace(TINY, stages=(Stage(2, {"warmup": 5}),))


def test_the_model_card_describes_each_stage():
    from mechscope.zoo.card import render_card

    card = render_card(STAGED, {"architectures": ["GPT2LMHeadModel"]}, {"steps": 7}, {})
    assert "Stage 1 (steps 0-4)" in card and "Stage 2 (steps 4-7) -- shorter rows" in card
    assert "7 steps in 2 stages" in card and "Rows of 16 tokens" in card
    same = render_card(replace(STAGED, stages=(Stage(3, {"lr": 1e-3}),)), {}, {"steps": 7}, {})
    assert "Stage 2 (steps 4-7):\n- The data of stage 1." in same
