"""DeiT's distillation token as a model axis: where it sits, what it costs, what it refuses."""

from __future__ import annotations

import pytest
import torch

from caitlab.models import ImageTransformer, ModelConfigError, count_params

TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=3,
            num_heads=4, mlp_ratio=2.0)
PLACEMENTS = {"input": dict(class_token="input"),
              "insert": dict(class_token="insert", insert_layer=1),
              "class_attention": dict(class_token="class_attention", ca_depth=2)}


def _pair(placement: str, **kwargs):
    """The same model with and without the token, from one seed."""
    torch.manual_seed(0)
    plain = ImageTransformer(**TINY, **PLACEMENTS[placement], **kwargs)
    torch.manual_seed(0)
    dist = ImageTransformer(**TINY, **PLACEMENTS[placement], distillation_token=True,
                            **kwargs)
    return plain, dist


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_the_token_adds_a_token_and_a_head_and_nothing_else(placement):
    plain, dist = _pair(placement)
    extra = {k: v.shape for k, v in dist.state_dict().items() if k not in plain.state_dict()}
    assert extra == {"dist_token": (1, 1, 32), "head_dist.weight": (10, 32),
                     "head_dist.bias": (10,)}
    assert count_params(dist) - count_params(plain) == 32 + 10 * 32 + 10
    # the shared weights are drawn as without the token: a seed gives the same model
    for key, value in plain.state_dict().items():
        assert torch.equal(value, dist.state_dict()[key]), key
    assert dist.num_prefix_tokens == 2 and plain.num_prefix_tokens == 1
    assert dist.config["distillation_token"] is True


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_the_prediction_is_the_mean_of_the_two_heads(placement):
    _, model = _pair(placement)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    cls, dist = model.forward_heads(x)
    assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)
    model.train()
    assert model(x).shape == (4, 10)  # one output unless a distilled training asks for two
    model.set_distilled_training(True)
    out = model(x)
    assert isinstance(out, tuple) and [t.shape for t in out] == [(4, 10), (4, 10)]
    # the two tokens differ, so do the heads' inputs
    feats = model.eval().forward_features(x)
    assert not torch.allclose(feats[:, 0], feats[:, 1])


def test_in_class_attention_both_tokens_query_and_patches_stay_unwritten():
    _, model = _pair("class_attention")
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2 + 16, 32)
    # the SA stage never sees either token: its patch tokens are those of the model without
    plain, _ = _pair("class_attention")
    assert torch.allclose(plain.eval().forward_features(x)[:, 1:], feats[:, 2:], atol=1e-6)
    # each token's update depends on its own query: swapping the two swaps the outputs
    block = model.ca_blocks[0]
    patches = torch.randn(2, 16, 32)
    tokens = torch.randn(2, 2, 32)
    out = block(patches, tokens)
    swapped = block(patches, tokens.flip(1))
    assert torch.allclose(out, swapped.flip(1), atol=1e-5)


def test_static_keys_count_the_second_token():
    _, model = _pair("input", attention="static_key")
    assert model.layer_tokens == [18, 18, 18]
    assert model.blocks[0].attn.static_key.shape[1] == 18
    _, inserted = _pair("insert", attention="static_key")
    assert inserted.layer_tokens == [16, 18, 18]
    assert inserted.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_intermediates_hand_back_both_prefix_tokens():
    _, model = _pair("input")
    feats, taken = model.forward_intermediates(torch.randn(2, 1, 8, 8), indices=1,
                                               return_prefix_tokens=True)
    (patches, prefix), = taken
    assert patches.shape == (2, 32, 4, 4) and prefix.shape == (2, 2, 32)


def test_attention_maps_leave_the_distillation_token_out():
    _, model = _pair("class_attention")
    _, attention = model.eval().forward_attention(torch.randn(2, 1, 8, 8))
    assert [a.name for a in attention] == ["ca.0", "ca.1"]
    for a in attention:
        assert a.weights.shape == (2, 4, 1 + 16) and a.positions.shape == (2, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_token="none"), "distillation_token=true needs a class token"),
    (dict(class_token="input", keep_rate=0.7), "cannot be combined with keep_rate=0.7"),
])
def test_impossible_combinations_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ModelConfigError, match=message):
        ImageTransformer(**TINY, distillation_token=True, **kwargs)
