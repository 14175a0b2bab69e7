"""An edit record as an intervention: applied inside the block, the model restored bit for bit after."""

from __future__ import annotations

import pytest
import torch

from mechscope.model.hooked import HookedModel
from mechscope.steer.editing import EditError, EditRecord, equal_to_snapshot, mlp_out_weight, snapshot
from mechscope.steer.editing.records import mlp_out_name
from tiny_models import tiny_model


@pytest.fixture
def edited():
    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    original = snapshot(model)
    clean_logits = model(ids)
    name = mlp_out_name(model, 1)
    record = EditRecord.capture(model, [name], "manual")
    with torch.no_grad():
        mlp_out_weight(model, 1).add_(0.5)
    record.finish(model)
    edited_logits = model(ids)
    record.revert(model)
    return model, record, ids, original, clean_logits, edited_logits


def test_applied_block_holds_the_edit_and_restores_every_weight(edited):
    model, record, ids, original, clean_logits, edited_logits = edited
    assert not torch.allclose(clean_logits, edited_logits)
    with record.applied(model):
        torch.testing.assert_close(model(ids), edited_logits, rtol=0, atol=0)
    assert equal_to_snapshot(model, original) == []
    torch.testing.assert_close(model(ids), clean_logits, rtol=0, atol=0)


def test_applied_block_restores_after_an_exception_and_keeps_an_edit_already_in_place(edited):
    model, record, ids, original, _, edited_logits = edited
    with pytest.raises(RuntimeError, match="boom"), record.applied(model):
        raise RuntimeError("boom")
    assert equal_to_snapshot(model, original) == []
    record.apply(model)
    with record.applied(model):
        pass
    torch.testing.assert_close(model(ids), edited_logits, rtol=0, atol=0)  # it was there before: it stays
    record.revert(model)
    with torch.no_grad():
        mlp_out_weight(model, 1).mul_(2.0)  # neither the before nor the after state
    with pytest.raises(EditError, match="cannot apply"), record.applied(model):
        pass
