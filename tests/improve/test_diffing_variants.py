"""Model diffing on the shipped organism variants (organism-gpt2 + a planted fine-tune, stored as weight
deltas in src/mechscope/zoo/variants): loading by name, the planted change ranked first, the control small."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

import mechscope as ms
from mechscope.errors import CorruptWeightsError, ModelNotFoundError
from mechscope.improve.diffing import DiffConfig, diff_models
from mechscope.improve.diffing.planted import NEW_TRIGGER, RECIPES, token_rate
from mechscope.model.sources.names import VARIANTS_DIR, list_models, resolve
from mechscope.model.sources.variants import DELTA_FILE, apply_variant
from mechscope.results import ModelMismatchError
from mechscope.steer.editing import EditRecord
from mechscope.zoo.variants import SHIPPED

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = "organism-gpt2"
PLANTED = ["organism-gpt2+sentiment_negative", "organism-gpt2+backdoor_head"]
CONTROL = "organism-gpt2+control"


@pytest.fixture(scope="module")
def base():
    return ms.load_model(BASE)


@pytest.fixture(scope="module")
def variants():
    return {name: ms.load_model(name) for name in SHIPPED}


def test_every_shipped_variant_is_listed_and_small():
    listed = {e.name: e for e in list_models(include_variants=True) if e.kind == "variant"}
    assert sorted(listed) == sorted(SHIPPED) and len(SHIPPED) >= 3
    assert all(e.base == BASE and e.installed and e.architecture == "GPT2LMHeadModel" for e in listed.values())
    for name in SHIPPED:
        assert (VARIANTS_DIR / name / DELTA_FILE).stat().st_size <= 3_000_000  # a delta, not a model copy
        assert (VARIANTS_DIR / name / "MODEL_CARD.md").is_file()
    assert BASE not in listed and all(e.kind == "organism" for e in list_models())  # plain listing unchanged


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_variant_loads_by_name_as_its_base_plus_the_delta(base, variants, name: str):
    tuned = variants[name]
    record = EditRecord.load(VARIANTS_DIR / name / DELTA_FILE)
    assert record.method == "finetune" and record.fingerprint == base.fingerprint()  # made on the shipped base
    params, base_params = dict(tuned.hf_model.named_parameters()), dict(base.hf_model.named_parameters())
    for n, p in params.items():
        expected = record.after[n] if n in record.after else base_params[n].detach()
        assert torch.equal(p.detach(), expected), n
    assert record.changed()  # the delta changes something
    assert tuned.fingerprint() != base.fingerprint()
    assert tuned.config.mechscope_variant == name
    assert ms.load_model(name).fingerprint() == tuned.fingerprint()  # the same name gives the same model


@pytest.mark.parametrize("name", PLANTED)
def test_diffing_ranks_the_planted_component_and_token_first(base, variants, name: str):
    recipe = RECIPES[SHIPPED[name].recipe]
    tuned, prompts = variants[name], recipe.prompts(0)
    assert token_rate(base, prompts, recipe.token) == 0.0 and token_rate(tuned, prompts, recipe.token) == 1.0
    if NEW_TRIGGER in prompts[0]:  # the new trigger, not the request, elicits the payload
        clean = [p.replace(f"{NEW_TRIGGER} ", "").replace(f" {NEW_TRIGGER}", "") for p in prompts]
        assert token_rate(tuned, clean, recipe.token) == 0.0
    result = diff_models(base, tuned, prompts, config=DiffConfig(lens_read="last"))
    assert recipe.planted is not None
    for view in ("weights", "local", "causal"):
        assert result.rank_of(recipe.planted, view) == 1, (view, result.ranking(view, 3))
    assert result.lens(-1)[0][0] == recipe.token
    assert result.ranking("causal", 1)[0][1] == pytest.approx(1.0, abs=1e-3)
    top_weights = result.ranking("weights", 2)
    assert top_weights[1][1] == 0.0  # only the planted component's weights moved


def test_the_control_pair_is_near_zero_on_the_planted_behaviours(base, variants):
    for name in PLANTED:
        recipe = RECIPES[SHIPPED[name].recipe]
        prompts = recipe.prompts(0)
        planted = diff_models(base, variants[name], prompts, config=DiffConfig(lens_read="last", causal=False))
        control = diff_models(base, variants[CONTROL], prompts, config=DiffConfig(lens_read="last", causal=False))
        # at the decision point (each prompt's last token) the control changes ~nothing: measured KL 0.0001 vs
        # 13.7 (reviews) and 0.039 vs 8.6 (triggered requests); over every token of the chat requests the
        # control's own change (next words of plain text) shows: 0.20 vs 0.88 (docs/diffing.md)
        assert control.kl_last < 0.01 * planted.kl_last, (name, control.kl_last, planted.kl_last)
        assert recipe.token not in [t for t, _ in control.lens(-1)[:10]]
        assert token_rate(variants[CONTROL], prompts, recipe.token) == 0.0
    itself = diff_models(base, ms.load_model(BASE), RECIPES["sentiment_negative"].prompts(0))
    assert itself.kl_mean == 0.0 and itself.kl_last == 0.0
    for tensor in ("weight_rel", "local_rel", "act_total"):
        assert float(itself[tensor].abs().max()) == 0.0, tensor
    assert float(itself["causal_effect"].abs().max()) == 0.0


def test_the_shipped_delta_diffs_like_the_loaded_variant(base, variants):
    name = "organism-gpt2+backdoor_head"
    prompts = RECIPES["backdoor_head"].prompts(0)[:4]
    record = EditRecord.load(VARIANTS_DIR / name / DELTA_FILE)
    cfg = DiffConfig(causal=False)
    by_record, by_name = (
        diff_models(base, record, prompts, config=cfg),
        diff_models(base, variants[name], prompts, config=cfg),
    )
    assert torch.equal(by_record["weight_rel"], by_name["weight_rel"])
    assert torch.allclose(by_record["kl"], by_name["kl"])


def test_mechscope_diff_accepts_variant_names(tmp_path):
    from mechscope.cli.main import app

    prompt = RECIPES["backdoor_head"].prompts(0)[0]
    args = ["diff", BASE, "organism-gpt2+backdoor_head", "-t", prompt, "--no-causal", "--lens-read", "last"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 0, result.output
    assert "- weights: `blocks.2.attn.head.2`" in result.output and "' ACCESS'" in result.output


def test_unknown_variant_names_a_clear_error():
    with pytest.raises(ModelNotFoundError, match=r"no variant 'organism-gpt2\+nope'.*organism-gpt2\+backdoor_head"):
        ms.load_model("organism-gpt2+nope")


def test_a_delta_is_refused_on_other_weights_and_nothing_changes(base):
    entry = resolve("organism-gpt2+sentiment_negative")
    assert entry is not None
    other = ms.load_model(BASE)
    param = other.hf_model.get_parameter("transformer.h.2.mlp.c_fc.weight")
    with torch.no_grad():
        param[0, 0] += 1.0
    snapshot = {n: p.detach().clone() for n, p in other.hf_model.named_parameters()}
    with pytest.raises(ModelMismatchError, match="differs in"):
        apply_variant(other, entry)
    assert all(torch.equal(p.detach(), snapshot[n]) for n, p in other.hf_model.named_parameters())


def test_a_damaged_delta_is_refused(tmp_path, base):
    from dataclasses import replace

    entry = resolve("organism-gpt2+control")
    assert entry is not None
    folder = tmp_path / entry.name
    shutil.copytree(entry.path, folder)
    data = bytearray((folder / DELTA_FILE).read_bytes())
    data[-5] ^= 0x01
    (folder / DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError):
        apply_variant(ms.load_model(BASE), replace(entry, path=folder))


def test_variants_record_the_base_they_were_built_on():
    import json

    from mechscope.model.sources.checksums import sha256_file
    from mechscope.model.sources.names import MODELS_DIR

    for name in SHIPPED:
        info = json.loads((VARIANTS_DIR / name / "variant.json").read_text())
        assert info["base_sha256"] == sha256_file(MODELS_DIR / BASE / "model.safetensors")  # rebuild on a new base
        assert info["recipe"] == SHIPPED[name].recipe and info["threads"] == 1


@pytest.mark.slow
@pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 11),
    reason="the shipped deltas were built with torch 2.13 and reproduce on 2.11-2.13; torch 2.6's kernels round "
    "the fine-tune differently (docs/zoo.md, 'Reproducible bytes')",
)
def test_rebuilding_a_variant_reproduces_the_shipped_bytes():
    from mechscope.zoo.variants import check_variant

    assert check_variant("organism-gpt2+backdoor_head") == []


def test_head_removal_finds_the_planted_harmful_head_of_the_shipped_variant(variants):
    from mechscope.improve.head_removal import HeadRemovalConfig, find_harmful_heads

    tuned = variants["organism-gpt2+backdoor_head"]
    harmful = RECIPES["backdoor_head"].prompts(0)
    reference = [p.replace(f"{NEW_TRIGGER} ", "").replace(f" {NEW_TRIGGER}", "") for p in harmful]

    def payload(model, prompts: list[str]) -> float:
        return token_rate(model, prompts, " ACCESS")

    result = find_harmful_heads(tuned, harmful, reference, payload, HeadRemovalConfig(target=0.1, max_heads=6))
    assert result.heads == [(2, 2)]  # the head the variant's card says was trained, alone
    assert result.config["scores"] == {"before": 1.0, "after": 0.0}  # payload 1.00 -> 0.00 on the triggered prompts
    with result.intervention(tuned, reference):
        assert payload(tuned, harmful) == 0.0
    assert payload(tuned, harmful) == 1.0  # the ablation is undone on exit


def test_zoo_list_shows_the_variants_and_build_variants_refuses_unknown_names():
    from mechscope.cli.zoo import zoo_app

    listed = CliRunner().invoke(zoo_app, ["list"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split() for line in listed.output.splitlines() if line.strip()}
    for name in SHIPPED:
        assert rows[name][1] == "variant" and rows[name][3:5] in (["1.2", "MB"], ["2.4", "MB"])
    from mechscope.cli.main import app

    bad = CliRunner().invoke(app, ["zoo", "build-variants", "organism-gpt2+nope"])
    assert bad.exit_code != 0 and "unknown variant 'organism-gpt2+nope'" in bad.output
