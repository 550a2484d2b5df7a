"""Two more ablation axes: static-key attention and EViT token reorganisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from caitlab.analysis.attention_data import load_model
from caitlab.analysis.attention_maps import (
    AttentionError,
    attention_maps,
    class_row_attention,
)
from caitlab.analysis.report import Run, group_variants, table_rows, variant_label
from caitlab.models import (
    CheckpointError,
    ImageTransformer,
    ModelConfigError,
    count_macs,
    count_params,
    create_model,
    load_checkpoint,
)
from caitlab.models.axes import ablation_axes
from caitlab.models.layers import Attention, reorganise_tokens

TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4,
            num_heads=4, mlp_ratio=2.0)
PLACEMENTS = {  # placement: tokens each of the 4 SA layers sees (16 patches)
    "input": (dict(class_token="input"), [17, 17, 17, 17]),
    "insert": (dict(class_token="insert", insert_layer=2), [16, 16, 17, 17]),
    "class_attention": (dict(class_token="class_attention", ca_depth=2), [16, 16, 16, 16]),
    "none": (dict(class_token="none"), [16, 16, 16, 16]),
}


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def build(**kwargs) -> ImageTransformer:
    torch.manual_seed(0)
    return ImageTransformer(**{**TINY, **kwargs})


def assert_every_parameter_learns(model: ImageTransformer) -> None:
    model(images()).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


# --- static-key attention ------------------------------------------------------------------


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("talking_heads", [False, True])
def test_static_keys_are_sized_per_layer_and_replace_the_key_projection(placement,
                                                                        talking_heads):
    kwargs, tokens = PLACEMENTS[placement]
    standard = build(**kwargs, talking_heads=talking_heads)
    static = build(**kwargs, talking_heads=talking_heads, attention="static_key")
    assert static.layer_tokens == standard.layer_tokens == tokens
    for block, n in zip(static.blocks, tokens, strict=True):
        assert block.attn.static_key.shape == (4, n, 8)  # heads, tokens, head_dim
        assert not hasattr(block.attn, "qkv") and block.attn.qv.weight.shape == (64, 32)
    # the class-attention stage keeps projected keys
    assert all(hasattr(b.attn, "k") for b in static.ca_blocks)
    # per SA layer: the key projection (32x32 + bias 32) goes, one 32-d key per token comes
    assert count_params(static) == count_params(standard) - 4 * (32 * 32 + 32) + 32 * sum(tokens)
    assert static(images()).shape == (3, 10)
    assert_every_parameter_learns(static)


def test_static_key_parameter_counts_of_the_tiny_models():
    assert count_params(create_model("vit_tiny")) == 136074
    assert count_params(create_model("vit_tiny", attention="static_key")) == 123786
    assert count_params(create_model("cait_tiny")) == 203946
    assert count_params(create_model("cait_tiny", attention="static_key")) == 191402
    # and the key projection's MACs are gone: 4 layers x 17 tokens x 64 x 64
    saved = count_macs(create_model("vit_tiny")) - count_macs(create_model("vit_tiny",
                                                                          attention="static_key"))
    assert saved == 4 * 17 * 64 * 64


@pytest.mark.parametrize("talking_heads", [False, True])
def test_static_key_attention_is_softmax_of_queries_against_learned_keys(talking_heads):
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, talking_heads=talking_heads, static_keys=5).eval()
    with torch.no_grad():
        attn.static_key.normal_()  # keys that matter
    x = torch.randn(2, 5, 32)
    q, v = (attn.qv(x).view(2, 5, 2, 4, 8).permute(2, 0, 3, 1, 4))
    logits = q @ attn.static_key.transpose(-2, -1) * 8**-0.5  # (2, 4, 5, 5)
    if talking_heads:
        logits = torch.einsum("gh,bhnm->bgnm", attn.proj_l.weight, logits)
        logits = logits + attn.proj_l.bias[:, None, None]
        weights = torch.einsum("gh,bhnm->bgnm", attn.proj_w.weight, logits.softmax(dim=-1))
        weights = weights + attn.proj_w.bias[:, None, None]
    else:
        weights = logits.softmax(dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected)
    # the class row the attention tool and EViT use is row 0 of the same matrix
    torch.testing.assert_close(class_row_attention(attn, x), weights[:, :, 0])


def test_static_keys_make_attention_depend_on_token_positions():
    # Projected keys make self-attention permutation-equivariant; static keys belong to
    # positions, so reordering the tokens changes what each token gets.
    torch.manual_seed(0)
    x, perm = torch.randn(2, 6, 32), torch.tensor([3, 0, 5, 1, 4, 2])
    standard = Attention(dim=32, num_heads=4).eval()
    static = Attention(dim=32, num_heads=4, static_keys=6).eval()
    with torch.no_grad():
        static.static_key.normal_()
    torch.testing.assert_close(standard(x[:, perm]), standard(x)[:, perm])
    assert not torch.allclose(static(x[:, perm]), static(x)[:, perm], atol=1e-3)


def test_static_keys_run_through_sdpa_as_a_batch_view(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(k)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = build(attention="static_key")
    model(images(2))
    assert len(seen) == 4
    for k, block in zip(seen, model.blocks, strict=True):
        assert k.shape == (2, 4, 17, 8) and k.stride(0) == 0  # expanded, not copied
        assert k.data_ptr() == block.attn.static_key.data_ptr()


def _lightning_checkpoint(model: ImageTransformer, path) -> None:
    """What caitlab's ClassificationModule writes: the model under ``model.`` and its config."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "caitlab": {"model_config": model.config}}, path)


def test_static_key_checkpoint_round_trip(tmp_path):
    trained = build(attention="static_key", class_token="insert", insert_layer=1,
                    talking_heads=True)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = images()
    _lightning_checkpoint(trained, tmp_path / "last.ckpt")
    torch.save(trained.state_dict(), tmp_path / "bare.pth")
    for name in ("last.ckpt", "bare.pth"):
        fresh = build(attention="static_key", class_token="insert", insert_layer=1,
                      talking_heads=True)
        load_checkpoint(fresh, tmp_path / name)
        torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)
    rebuilt, _ = load_model(tmp_path / "last.ckpt")  # what caitlab-attention does
    assert rebuilt.config == trained.config
    torch.testing.assert_close(rebuilt(x), trained(x), rtol=0, atol=0)


def test_a_standard_checkpoint_does_not_load_into_a_static_key_model(tmp_path):
    torch.save(build().state_dict(), tmp_path / "standard.pth")
    static = build(attention="static_key")
    before = {k: v.clone() for k, v in static.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(static, tmp_path / "standard.pth")
    message = str(err.value)
    assert "(12 missing, 8 unexpected, 0 wrong shape)" in message
    assert "missing blocks.0.attn.static_key, blocks.0.attn.qv.weight" in message
    assert "unexpected blocks.0.attn.qkv.weight" in message
    assert all(torch.equal(v, static.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("class_token", ["input", "class_attention"])
def test_static_keys_are_resampled_with_the_position_embedding(tmp_path, class_token):
    small = build(attention="static_key", class_token=class_token)
    prefix = 1 if class_token == "input" else 0
    source = small.blocks[0].attn.static_key
    with torch.no_grad():  # the same key at every patch position: head h, dim j -> 100 h + j
        source[:, prefix:] = (100 * torch.arange(4.0)[:, None] + torch.arange(8.0))[:, None]
    torch.save(small.state_dict(), tmp_path / "small.pth")
    large = build(attention="static_key", class_token=class_token, img_size=12)  # 6x6 patches
    load_checkpoint(large, tmp_path / "small.pth")
    key = large.blocks[0].attn.static_key
    assert key.shape == (4, 36 + prefix, 8)
    torch.testing.assert_close(key[:, :prefix], source[:, :prefix])  # the class token's key
    # interpolated over the grid only: no head or channel mixed into another
    torch.testing.assert_close(key[:, prefix:], source[:, prefix:prefix + 1].expand(-1, 36, -1))
    assert large(torch.randn(2, 1, 12, 12)).shape == (2, 10)


# --- EViT token reorganisation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,attending,leaving",
    [
        # 16 patches; keep_rate 0.7 at layers 1, 2: ceil(11.2) = 12 kept + 1 fused + cls = 14,
        # then ceil(0.7 * 13) = 10 kept + 1 fused + cls = 12
        (dict(class_token="input", keep_rate=0.7, reorg_layers=[1, 2]),
         [17, 17, 14, 12], [17, 14, 12, 12]),
        (dict(class_token="insert", insert_layer=1, keep_rate=0.5, reorg_layers=[1, 3]),
         [16, 17, 10, 10], [16, 10, 10, 7]),
        # "auto" is the paper's 3, 6, 9 of 12 scaled to depth 4: layers 1, 2, 3
        (dict(class_token="input", keep_rate=0.5, reorg_layers="auto", talking_heads=True),
         [17, 17, 10, 7], [17, 10, 7, 5]),
    ],
)
def test_reorganising_layers_hand_fewer_tokens_on(kwargs, attending, leaving):
    model = build(**kwargs)
    assert model.layer_tokens == attending
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1])))
    assert model(images()).shape == (3, 10)
    assert seen == list(zip(attending, leaving, strict=True))
    assert model.forward_features(images()).shape[1] == leaving[-1]
    assert_every_parameter_learns(model)


def test_reorganisation_keeps_the_most_attended_tokens_and_fuses_the_rest():
    model = build(keep_rate=0.5, reorg_layers=[0], talking_heads=True).eval()
    block = model.blocks[0]
    x = torch.cat((model._cls(3), model.patch_embed(images()) + model.pos_embed), dim=1)
    # reference: the class token's row of the full (talking-heads) attention matrix
    u = block.norm1(x)
    q, k, _ = block.attn.qkv_heads(u)
    full = torch.einsum("gh,bhnm->bgnm", block.attn.proj_l.weight,
                        (q * block.attn.scale) @ k.transpose(-2, -1))
    full = (full + block.attn.proj_l.bias[:, None, None]).softmax(dim=-1)
    full = torch.einsum("gh,bhnm->bgnm", block.attn.proj_w.weight, full)
    row = (full + block.attn.proj_w.bias[:, None, None])[:, :, 0]
    attentiveness = row[:, :, 1:].mean(dim=1)  # (3, 16), averaged over heads
    with torch.no_grad():
        y = x + block.ls1(block.attn(u))
        out = reorganise_tokens(y, class_row_attention(block.attn, u), 0.5)
    assert out.shape == (3, 1 + 8 + 1, 32)
    top = attentiveness.topk(8, dim=1).indices
    rest = attentiveness.argsort(dim=1, descending=True)[:, 8:]
    for b in range(3):
        torch.testing.assert_close(out[b, 0], y[b, 0])
        torch.testing.assert_close(out[b, 1:9], y[b, 1 + top[b]])
        fused = (attentiveness[b, rest[b], None] * y[b, 1 + rest[b]]).sum(dim=0)
        torch.testing.assert_close(out[b, 9], fused)
    # and the whole block does exactly that before its MLP
    expected = out + block.ls2(block.mlp(block.norm2(out)))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("keep_rate", [1.0, 0.99])  # 0.99 * 16 rounds up to all 16 tokens
def test_keeping_every_token_is_exactly_the_plain_model(keep_rate):
    plain = build(talking_heads=True, class_token="insert", insert_layer=1).eval()
    evit = build(talking_heads=True, class_token="insert", insert_layer=1, keep_rate=keep_rate,
                 reorg_layers=[1, 2, 3]).eval()
    evit.load_state_dict(plain.state_dict())
    x = images()
    torch.testing.assert_close(evit(x), plain(x), rtol=0, atol=0)
    assert evit.layer_tokens == plain.layer_tokens
    assert evit.config["keep_rate"] == keep_rate


def test_reorganisation_saves_macs_where_the_tokens_go():
    d, hidden = 32, 64

    def block_macs(n_attn: int, n_mlp: int, reorganises: bool) -> int:
        qkv_proj = n_attn * d * 3 * d + n_attn * d * d
        attention = 2 * n_attn * n_attn * d
        class_row = n_attn * d if reorganises else 0  # the class query against every key
        return qkv_proj + attention + class_row + n_mlp * 2 * d * hidden

    plain = build()
    evit = build(keep_rate=0.7, reorg_layers=[1, 2])
    attending, leaving = [17, 17, 14, 12], [17, 14, 12, 12]
    expected = sum(block_macs(a, m, i in (1, 2)) - block_macs(17, 17, False)
                   for i, (a, m) in enumerate(zip(attending, leaving, strict=True)))
    assert count_macs(evit) - count_macs(plain) == expected < 0


def test_deit_small_with_evit_at_the_papers_layers():
    with torch.device("meta"):
        models = {kr: create_model("deit_small_patch16_224", keep_rate=kr, reorg_layers="auto")
                  for kr in (1.0, 0.7, 0.5)}
    # the official code's counts: 197 -> 140 -> 100 -> 72 at keep rate 0.7, after layers 3, 6, 9
    assert models[0.7].layer_tokens == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert models[0.7].config["reorg_layers"] == [3, 6, 9]
    macs = {kr: count_macs(m) for kr, m in models.items()}
    assert macs[1.0] > macs[0.7] > macs[0.5]
    assert round(macs[1.0] / 1e9, 1) == 4.6 and round(macs[0.7] / 1e9, 1) == 3.0
    assert count_params(models[0.7]) == count_params(models[1.0])  # EViT adds no parameters


def test_evit_checkpoint_round_trip_and_attention_maps(tmp_path):
    model = build(keep_rate=0.5, reorg_layers=[1, 2]).eval()
    _lightning_checkpoint(model, tmp_path / "best.ckpt")
    rebuilt, _ = load_model(tmp_path / "best.ckpt")
    x = images()
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    layers = attention_maps(rebuilt, x, last_layers=4)
    assert [la.name for la in layers] == ["sa.0", "sa.1", "sa.2", "sa.3"]
    assert [la.weights.shape[-1] for la in layers] == [17, 17, 10, 7]
    for i, la in enumerate(layers):
        assert la.maps.shape == (3, 4, 4, 4)
        # patches a layer no longer sees are 0, fused tokens are not on the grid, and every
        # cell shown is the weight of one token the layer sees
        visible = (la.maps != 0).flatten(2).sum(-1)
        assert torch.isin(la.maps[la.maps != 0], la.weights[:, :, 1:]).all()
        if i < 3:  # sa.2 sees 8 kept patches and the fused token
            assert (visible == [16, 16, 8][i]).all()
        else:  # sa.3 sees 5 kept tokens, which may include sa.2's fused one, and a new fused
            assert ((visible >= 4) & (visible <= 5)).all()
    # before any reorganisation, the map is the plain class row on the grid
    torch.testing.assert_close(layers[1].maps.flatten(2), layers[1].weights[:, :, 1:])
    # a kept patch's weight sits in its own grid cell: the top patch of layer 1 stays visible
    top = layers[1].weights[:, :, 1:].mean(1).argmax(dim=1)
    assert all(layers[2].maps[b].flatten(1)[:, top[b]].ne(0).all() for b in range(3))


def test_the_attention_tool_still_refuses_models_without_a_class_token():
    with pytest.raises(AttentionError, match="no class token"):
        attention_maps(build(class_token="none", attention="static_key"), images())


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(attention="linear"), "attention='linear' must be one of standard, static_key"),
        (dict(keep_rate=0.0), "keep_rate=0.0 must be in (0, 1]"),
        (dict(keep_rate=1.5), "keep_rate=1.5 must be in (0, 1]"),
        (dict(keep_rate="most"), "keep_rate='most' must be in (0, 1]"),
        (dict(keep_rate=0.7, reorg_layers=[4]), "reorg_layers=[4]: layer 4 is not in [0, depth=4)"),
        (dict(keep_rate=0.7, reorg_layers=[-1]), "layer -1 is not in [0, depth=4)"),
        (dict(keep_rate=0.7, reorg_layers=[1, 1]), "reorg_layers=[1, 1] repeats a layer"),
        (dict(keep_rate=0.7, reorg_layers="middle"), "reorg_layers='middle' must be 'auto' or"),
        (dict(keep_rate=0.7, class_token="class_attention"),
         "with class_token=class_attention: the class token only exists in the "
         "class-attention stage, so it cannot rank patch tokens in self-attention"),
        (dict(keep_rate=0.7, class_token="none"),
         "with class_token=none: there is no class token to rank patch tokens"),
        (dict(keep_rate=0.7, class_token="insert", insert_layer=2, reorg_layers=[1, 3]),
         "reorg_layers=[1, 3]: layer 1 comes before the class token joins (insert_layer=2)"),
        (dict(keep_rate=0.7, attention="static_key"),
         "attention=static_key cannot be combined with keep_rate=0.7"),
    ],
)
def test_impossible_combinations_raise_one_clear_error(kwargs, message):
    with pytest.raises(ModelConfigError) as err:
        build(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_reorganisation_switched_off_is_allowed_everywhere():
    # keep_rate 1.0 (the default) means no reorganisation: any placement, static keys, and
    # listed layers are fine, and the config says "off" the one way
    for class_token in ("class_attention", "none"):
        model = build(class_token=class_token, attention="static_key", reorg_layers=[1, 2])
        assert model.config["keep_rate"] == 1.0 and model.config["reorg_layers"] == []
    assert build(keep_rate=0.5, reorg_layers=[]).layer_tokens == [17] * 4


# --- wiring: axes and the report -----------------------------------------------------------------


def _run(model: ImageTransformer, name: str, top1: float) -> Run:
    axes = ablation_axes(model.config, name)
    return Run(name, {"status": "completed", "axes": axes, "variant": json_key(axes),
                      "test/top1": top1, "model": {"params": count_params(model)}})


def json_key(axes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(axes.items()))


def test_the_report_tells_the_new_variants_apart():
    runs = [
        _run(build(), "vit_tiny", 0.93),
        _run(build(attention="static_key"), "vit_tiny", 0.91),
        _run(build(keep_rate=0.7, reorg_layers=[1, 2]), "vit_tiny", 0.92),
        _run(build(keep_rate=0.5, reorg_layers=[1, 2]), "vit_tiny", 0.90),
    ]
    axes = [r.axes for r in runs]
    assert [a["attention"] for a in axes] == ["standard", "static_key", "standard", "standard"]
    assert [a["keep_rate"] for a in axes] == [None, None, 0.7, 0.5]
    assert [a["reorg_layers"] for a in axes] == [None, None, [1, 2], [1, 2]]
    variants = group_variants(runs)
    rows = table_rows(variants)
    assert [(r["attention"], r["token reorg"], r["test top-1"]) for r in rows] == [
        ("standard", "", "93.00"), ("standard", "0.7 @ 1,2", "92.00"),
        ("standard", "0.5 @ 1,2", "90.00"), ("static_key", "", "91.00")]
    assert {variant_label(v) for v in variants} == {
        "vit_tiny input none d4", "vit_tiny input none d4 static-key",
        "vit_tiny input none d4 keep 0.7", "vit_tiny input none d4 keep 0.5"}
    # a sweep that uses neither axis keeps its table as it was
    plain = table_rows(group_variants(runs[:1]))
    assert "attention" not in plain[0] and "token reorg" not in plain[0]


def test_kept_token_count_follows_the_paper_without_float_noise():
    from caitlab.models.layers import kept_tokens

    assert kept_tokens(196, 0.7) == math.ceil(0.7 * 196) == 138
    assert kept_tokens(10, 0.7) == 7  # math.ceil(0.7 * 10) would say 8
    assert kept_tokens(16, 1.0) == 16 and kept_tokens(3, 0.01) == 1
