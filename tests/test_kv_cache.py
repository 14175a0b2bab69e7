"""The KV-cache keyword follows the installed transformers (``cache`` from 5.24, ``past_key_values`` before)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mechscope.model.kv_cache import cache_argument, cache_keyword
from tiny_models import tiny_model


def test_the_keyword_is_one_the_model_forward_accepts():
    model, _ = tiny_model("llama", with_tokenizer=False)
    keyword = cache_keyword(model)
    assert keyword in inspect.signature(type(model).forward).parameters


def test_a_model_without_the_new_name_gets_the_old_one():
    class Old(nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values=None):  # the pre-5.24 spelling
            return input_ids

    assert cache_keyword(Old()) == "past_key_values"


def test_either_spelling_of_a_received_cache_is_found():
    marker = object()
    assert cache_argument({"cache": marker}) is marker
    assert cache_argument({"past_key_values": marker}) is marker
    assert cache_argument({"input_ids": 1}) is None
