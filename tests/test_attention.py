"""LinearAttention: the same attention as open_clip's, with LoRA as peft's plain Linear LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from savlt_model.config import load_config
from savlt_model.errors import SavltError
from savlt_model.model.adapters import payload_parameters
from savlt_model.model.attention import LinearAttention, lora_targets
from savlt_model.model.backbone import load_backbone
from savlt_model.model.savlt import SavltModel


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("savlt-tiny")


@pytest.mark.parametrize("causal", [False, True])
def test_matches_multihead_attention(causal):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(3, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None
    want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    got, weights = LinearAttention(mha)(x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_refuses_what_it_cannot_compute():
    with pytest.raises(SavltError, match="batch-first self-attention"):
        LinearAttention(nn.MultiheadAttention(8, 2))  # sequence-first
    attn = LinearAttention(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, torch.randn(1, 3, 8), x)


def test_lora_targets_split_multihead_attention_in_place():
    root = nn.Module()
    root.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    assert lora_targets(root, ["attn"]) == ["attn.qkv", "attn.out_proj"]
    assert isinstance(root.attn, LinearAttention)


def test_model_output_is_unchanged_by_the_split(tiny):
    """At initialisation (LoRA B = 0) the model's image tower equals the plain open_clip one."""
    model = SavltModel(load_config(None, []), tiny).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        got = model.clip.encode_image(x)
        want = tiny.model.eval().encode_image(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_lora_dropout_acts_and_frozen_weights_stay_untouched(tiny):
    """peft's MultiheadAttention LoRA merged the delta (no dropout) and wrote the frozen
    weights on every forward; on Linears dropout acts in training and nothing is written."""
    model = SavltModel(load_config(None, ["model.lora.dropout=0.5"]), tiny)
    with torch.no_grad():
        for name, p in payload_parameters(model).items():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = torch.randn(2, 3, 128, 128)
    model.train()
    torch.manual_seed(0)
    first = model(x).features
    second = model(x).features
    assert not torch.allclose(first, second)  # two dropout masks
    model.loss(model(x), torch.tensor([0, 1])).backward()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).features, model(x).features)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
