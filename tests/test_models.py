"""The model family: every ablation knob, the named variants, cost counting, bad arguments."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Paper Table 3 (CaiT) and DeiT Table 1, millions of parameters at 224 px and 1000 classes:
# one table, shared with caitlab-bench --compare-paper.
from caitlab.analysis.paper import PAPER_PARAMS_M
from caitlab.config import CONF_DIR
from caitlab.models import (
    ImageTransformer,
    ModelConfigError,
    ModelSpec,
    UnknownModelError,
    count_macs,
    count_params,
    create_model,
    layerscale_eps_for_depth,
    list_models,
)
from caitlab.models.checkpoint import remap_state_dict
from caitlab.models.layers import (
    Attention,
    Block,
    ClassAttention,
    ClassAttentionBlock,
    ResidualScale,
)
from caitlab.models.presets import preset_files, render

TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=3,
            num_heads=4, mlp_ratio=2.0)
PLACEMENTS = [
    dict(class_token="input"),
    dict(class_token="insert", insert_layer=2),
    dict(class_token="class_attention", ca_depth=2),
    dict(class_token="none"),
]
RESIDUALS = ["none", "rezero", "rezero_norm", "layerscale"]


@pytest.mark.parametrize(
    "placement,residual,talking_heads",
    list(itertools.product(PLACEMENTS, RESIDUALS, [False, True])),
    ids=lambda v: v["class_token"] if isinstance(v, dict) else str(v),
)
def test_every_knob_gives_logits_and_gradients(placement, residual, talking_heads):
    torch.manual_seed(0)
    model = ImageTransformer(**TINY, **placement, residual=residual, talking_heads=talking_heads,
                             layerscale_init=0.1)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    # ReZero blocks start as the identity, which cuts the input off a class-token output at
    # init; with every branch scale switched on, every path from input to output is live.
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    with torch.no_grad():
        for g in gammas:
            g.fill_(0.1)
    model.zero_grad()
    x.grad = None
    model(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(g.grad.abs().sum() > 0 for g in gammas)
    assert (model.cls_token is None) == (placement["class_token"] == "none")
    if placement["class_token"] != "none":
        assert model.cls_token.grad.abs().sum() > 0


def test_class_attention_reads_patch_tokens_but_never_changes_them():
    torch.manual_seed(0)
    model = ImageTransformer(**TINY, class_token="class_attention", ca_depth=2,
                             residual="layerscale", layerscale_init=0.5).eval()
    seen = {}
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(sa_out=o.detach()))
    out = model.forward_features(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 1 + 16, 32)
    # The patch tokens leaving the model are the SA stack's output, only normalised.
    with torch.no_grad():
        torch.testing.assert_close(out[:, 1:], model.norm(seen["sa_out"]), rtol=0, atol=0)
    # and no class-attention weight can influence them (a random projection: the plain sum
    # of LayerNorm outputs is a constant, whose gradient is zero whatever the graph) ...
    probe = torch.randn(32)
    (out[:, 1:] * probe).sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in model.blocks.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.ca_blocks.parameters())
    # ... while the class token depends on the patches (it reads them).
    model.zero_grad()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    (model.forward_features(x)[:, 0] * probe).sum().backward()
    assert x.grad.abs().sum() > 0
    block = model.ca_blocks[0]
    cls = block(torch.randn(2, 16, 32), torch.randn(2, 1, 32))
    assert cls.shape == (2, 1, 32)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_class_token_inserted_at_layer_k(k):
    model = ImageTransformer(**TINY, class_token="insert", insert_layer=k)
    lengths = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    model(torch.randn(1, 1, 8, 8))
    assert lengths == [16] * k + [17] * (3 - k)


def test_input_placement_is_insert_at_layer_zero():
    torch.manual_seed(0)
    a = ImageTransformer(**TINY, class_token="input")
    b = ImageTransformer(**TINY, class_token="insert", insert_layer=0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("depth,eps", [(12, 0.1), (18, 0.1), (24, 1e-5), (36, 1e-6), (48, 1e-6)])
def test_layerscale_auto_eps_follows_the_paper(depth, eps):
    assert layerscale_eps_for_depth(depth) == eps
    with torch.device("meta"):
        model = ImageTransformer(embed_dim=24, num_heads=2, depth=depth, residual="layerscale",
                                 class_token="class_attention", layerscale_init="auto")
    assert model.config["layerscale_init"] == eps


def test_residual_scaling_init_values_and_norms():
    ls = ImageTransformer(**TINY, residual="layerscale", layerscale_init=3e-4,
                          class_token="class_attention")
    for block in [*ls.blocks, *ls.ca_blocks]:
        for scale in (block.ls1, block.ls2):
            assert isinstance(scale, ResidualScale)
            assert scale.gamma.shape == (32,)
            assert torch.all(scale.gamma == torch.tensor(3e-4))
        assert isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)
        assert block.norm1.eps == 1e-6
    for residual, has_norm in (("rezero", False), ("rezero_norm", True)):
        model = ImageTransformer(**TINY, residual=residual, class_token="class_attention")
        for block in [*model.blocks, *model.ca_blocks]:
            assert block.ls1.gamma.shape == (1,) and block.ls1.gamma.item() == 0.0
            assert block.ls2.gamma.shape == (1,) and block.ls2.gamma.item() == 0.0
            assert isinstance(block.norm1, nn.LayerNorm) == has_norm
            assert isinstance(block.norm2, nn.LayerNorm) == has_norm
    plain = ImageTransformer(**TINY, residual="none")
    assert not any(n.endswith("gamma") for n, _ in plain.named_parameters())
    # A ReZero model is exactly the identity on tokens at init: only embedding and head act.
    rz = ImageTransformer(**TINY, residual="rezero", class_token="none").eval()
    x = torch.randn(2, 1, 8, 8)
    tokens = rz.pos_drop(rz.patch_embed(x) + rz.pos_embed)
    torch.testing.assert_close(rz.forward_features(x), rz.norm(tokens))


def test_talking_heads_adds_head_mixing_only_in_self_attention():
    base = ImageTransformer(**TINY, class_token="class_attention")
    th = ImageTransformer(**TINY, class_token="class_attention", talking_heads=True)
    # two (heads x heads) linears with bias per SA layer
    assert count_params(th) - count_params(base) == 3 * 2 * (4 * 4 + 4)
    assert not any("proj_l" in n for n, _ in th.ca_blocks.named_parameters())


class MapDtypes(TorchDispatchMode):
    """Records the dtype of every op output holding a (batch, heads, n, n) attention map
    (any view of it), and of every softmax input."""

    def __init__(self, batch: int, heads: int, n: int) -> None:
        super().__init__()
        self.lead, self.numel = (batch, heads), batch * heads * n * n
        self.maps: list[tuple[str, torch.dtype]] = []
        self.softmax_inputs: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._softmax.default:
            self.softmax_inputs.append(args[0].dtype)
        if (isinstance(out, torch.Tensor) and out.shape[:2] == self.lead
                and out.numel() == self.numel):
            self.maps.append((str(func), out.dtype))
        return out


def test_talking_heads_maps_stay_in_autocast_dtype():
    # The head mixes are small matmuls over full n x n maps: a bias added in fp32 would
    # promote the maps, and the softmax over them, out of bf16 (time and memory on GPU).
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, talking_heads=True).eval()
    recorder = MapDtypes(batch=2, heads=4, n=16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        out = attn(torch.randn(2, 16, 32))
    assert out.dtype == torch.bfloat16
    assert recorder.softmax_inputs == [torch.bfloat16]
    assert len(recorder.maps) >= 3  # q @ k^T, the mix before the softmax and the one after
    assert all(dtype == torch.bfloat16 for _, dtype in recorder.maps), recorder.maps


def test_drop_path_schedules():
    uni = ImageTransformer(**{**TINY, "depth": 4}, drop_path_rate=0.3, drop_path_schedule="uniform")
    lin = ImageTransformer(**{**TINY, "depth": 4}, drop_path_rate=0.3, drop_path_schedule="linear")
    assert [b.drop_path.drop_prob for b in uni.blocks] == pytest.approx([0.3] * 4)
    assert isinstance(lin.blocks[0].drop_path, nn.Identity)
    assert [b.drop_path.drop_prob for b in lin.blocks[1:]] == pytest.approx([0.1, 0.2, 0.3])


def test_stochastic_depth_and_dropout_only_in_training():
    torch.manual_seed(0)
    model = ImageTransformer(**TINY, drop_path_rate=0.5, drop_rate=0.5)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_non_square_images_and_any_channels():
    model = ImageTransformer(img_size=(8, 12), patch_size=4, in_chans=5, num_classes=3,
                             embed_dim=16, depth=1, num_heads=2)
    assert model.pos_embed.shape == (1, 6, 16)
    assert model(torch.randn(2, 5, 8, 12)).shape == (2, 3)


def test_every_paper_variant_is_registered():
    assert set(PAPER_PARAMS_M) <= set(list_models())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_named_variant_parameter_count_matches_paper(name):
    with torch.device("meta"):
        model = create_model(name, img_size=224)
    assert round(count_params(model) / 1e6, 1) == PAPER_PARAMS_M[name]


def test_named_variant_native_resolution_and_structure():
    with torch.device("meta"):
        m48 = create_model("cait_m48_448")
        deit = create_model("deit_small_patch16_224")
    assert m48.config["img_size"] == [448, 448] and len(m48.blocks) == 48
    assert len(m48.ca_blocks) == 2 and m48.config["talking_heads"]
    assert m48.config["layerscale_init"] == 1e-6
    assert deit.config["class_token"] == "input" and len(deit.ca_blocks) == 0
    assert deit.config["residual"] == "none" and deit.config["drop_path_schedule"] == "linear"


@pytest.mark.parametrize("name,gmacs", [("cait_s24_224", 9.3), ("cait_xxs24_224", 2.5),
                                        ("deit_small_patch16_224", 4.6)])
def test_macs_match_paper(name, gmacs):
    with torch.device("meta"):
        model = create_model(name)
    assert round(count_macs(model) / 1e9, 1) == gmacs


def test_macs_grow_with_tokens_and_depth_as_expected():
    small = ImageTransformer(**{**TINY, "depth": 2})
    deep = ImageTransformer(**{**TINY, "depth": 4})
    per_block = count_macs(deep) - count_macs(small)
    n, d = 17, 32  # tokens incl. class token, width
    # qkv + proj + mlp(2x) linears, plus QK^T and AV
    expected = 2 * (n * d * 3 * d + n * d * d + 2 * n * d * 2 * d + 2 * n * n * d)
    assert per_block == expected


def test_create_model_applies_overrides():
    model = create_model("cait_tiny", depth=2, class_token="input", residual="rezero")
    assert len(model.blocks) == 2 and model.config["class_token"] == "input"
    assert model.config["residual"] == "rezero"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(embed_dim=30, num_heads=4), "embed_dim=30 is not divisible by num_heads=4"),
        (dict(img_size=10, patch_size=4), "img_size=10 is not divisible by patch_size=4"),
        (dict(class_token="insert", insert_layer=3), "insert_layer=3 must be in [0, depth=3)"),
        (dict(class_token="insert", insert_layer=-1), "insert_layer=-1"),
        (dict(depth=-2), "depth=-2 must be a positive integer"),
        (dict(depth=0), "depth=0 must be a positive integer"),
        (dict(num_heads=0), "num_heads=0 must be a positive integer"),
        (dict(class_token="middle"), "class_token='middle' must be one of"),
        (dict(residual="fixup"), "residual='fixup' must be one of"),
        (dict(class_token="class_attention", ca_depth=0), "ca_depth=0"),
        (dict(residual="layerscale", layerscale_init=-1), "layerscale_init=-1"),
        (dict(residual="layerscale", layerscale_init="big"), "layerscale_init='big'"),
        (dict(drop_path_rate=1.5), "drop_path_rate=1.5 must be in [0, 1)"),
        (dict(drop_path_schedule="cosine"), "drop_path_schedule='cosine'"),
        (dict(patch_size=0), "patch_size=0"),
    ],
)
def test_impossible_models_raise_one_clear_error(kwargs, message):
    for make in (ImageTransformer, ModelSpec):  # the model refuses what its spec refuses
        with pytest.raises(ModelConfigError) as err:
            make(**{**TINY, **kwargs})
        assert message in str(err.value)
        assert "\n" not in str(err.value)


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(UnknownModelError, match="unknown model name 'cait_xxs42_224'.*cait_"):
        create_model("cait_xxs42_224")


# --- the spec, the layers' arguments, the presets --------------------------------------------


def test_the_spec_takes_exactly_the_constructors_arguments():
    # callers and Hydra configs pass the constructor's arguments; the model is built from the
    # spec's: one list, in the same order, with the same types and defaults
    def arguments(signature: inspect.Signature) -> list[tuple]:
        return [(p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values()]

    assert arguments(inspect.signature(ImageTransformer)) == arguments(
        inspect.signature(ModelSpec))


def test_a_spec_resolves_every_spelling_of_a_model_to_one():
    cait = dict(TINY, class_token="class_attention", residual="layerscale")
    given = ModelSpec(**cait, reorg_layers=[2, 1])
    same = ModelSpec(**{**cait, "img_size": (8, 8), "patch_size": [2, 2]}, layerscale_init=0.1,
                     insert_layer=2, keep_rate=1)
    assert given != same and given.resolved() == same.resolved()
    resolved = given.resolved()
    assert resolved.resolved() == resolved
    assert (resolved.img_size, resolved.patch_size) == ((8, 8), (2, 2))
    assert (resolved.layerscale_init, resolved.insert_layer, resolved.ca_depth) == (0.1, 0, 2)
    assert (resolved.keep_rate, resolved.reorg_layers) == (1.0, ())
    # "auto" stays a choice until resolved: the same spec deeper takes the deeper eps
    assert given.layerscale_init == "auto"
    assert dataclasses.replace(given, depth=24).resolved().layerscale_init == 1e-5
    assert given.reorg_layers == (2, 1) and hash(given) == hash(ModelSpec(**cait,
                                                                          reorg_layers=(2, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.depth = 4  # type: ignore[misc]
    model = ImageTransformer(**cait, reorg_layers=[2, 1])
    assert model.spec == given and model.config == given.as_config()
    assert ImageTransformer(**dataclasses.asdict(model.spec)).config == model.config


@pytest.mark.parametrize("layer", [Attention, ClassAttention, Block, ClassAttentionBlock])
def test_layers_take_keyword_arguments_only(layer):
    # proj_drop, attn_drop and drop_path are all rates: a positional call could swap them
    # without an error
    assert all(p.kind is p.KEYWORD_ONLY for p in inspect.signature(layer).parameters.values())
    with pytest.raises(TypeError):
        layer(32, 4)


MODEL_PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
# What a preset may hold that its variant does not: the data's image channels and classes,
# and the training settings it sets on purpose: the stochastic depth each model was trained
# with in the paper, where the variant (as timm's) builds the model without any.
DATA_BOUND = {"in_chans": "${data.in_chans}", "num_classes": "${data.num_classes}"}
TRAINING_SETTINGS = {"drop_path_rate"}


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_a_preset_repeats_its_variants_values_and_adds_only_training_settings(preset):
    # A preset's keys override its variant's arguments: Hydra can only override a key the
    # config holds, so the preset repeats them; any it repeats must be the variant's own.
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"model={preset}"])
    keys = OmegaConf.to_container(cfg.model, resolve=False)
    assert keys.pop("_target_") == "caitlab.models.create_model"
    name = keys.pop("name")
    assert name in list_models()
    for key, value in DATA_BOUND.items():
        assert keys.pop(key) == value, key
    training = {key: keys.pop(key) for key in TRAINING_SETTINGS & set(keys)}
    with torch.device("meta"):
        variant = create_model(name).spec
    assert set(keys) <= {f.name for f in dataclasses.fields(ModelSpec)}
    assert {k: (type(v), v) for k, v in keys.items()} == {
        k: (type(getattr(variant, k)), getattr(variant, k)) for k in keys}
    dataclasses.replace(variant, **training)  # a model the variant can be


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_a_presets_architecture_lines_are_its_variants_as_the_script_writes_them(preset):
    # the variant is the one place an architecture is written: scripts/model_presets.py
    # writes these lines from it, and an edit to them alone would silently win over it
    path = Path(CONF_DIR) / "model" / f"{preset}.yaml"
    assert path in preset_files(path.parent)
    assert render(preset, path.read_text()) == path.read_text(), \
        f"{path} differs from its variant: run scripts/model_presets.py"


def test_a_preset_line_that_differs_from_its_variant_is_rewritten(tmp_path):
    text = (Path(CONF_DIR) / "model" / "cait_s24_224.yaml").read_text()
    edited = text.replace("depth: 24  #", "depth: 36  #")
    assert edited != text and render("cait_s24_224", edited) == text


# --- forward_intermediates: timm's contract, checked against timm's own -------------------


def timm_twin(timm_name: str, ours_name: str, **kwargs):
    """A small timm model (``pretrained=False``) with every parameter made to matter, and
    ours with its weights: (timm, ours), both in eval mode."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = create_model(ours_name, **kwargs).eval()
    ours.load_state_dict(remap_state_dict(ref.state_dict(), ours))
    return ref, ours


def assert_same_intermediates(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple):
            assert isinstance(y, tuple) and len(x) == len(y)
            assert_same_intermediates(x, y)
        else:
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cait_twin():
    return timm_twin("cait_xxs24_224", "cait_xxs24_224", img_size=64, depth=4)


@pytest.fixture(scope="module")
def vit_twin():
    return timm_twin("deit_tiny_patch16_224", "deit_tiny_patch16_224", img_size=64, depth=3)


CALLS = [dict(), dict(indices=2), dict(indices=[0, -1], norm=True), dict(output_fmt="NLC"),
         dict(indices=[1], stop_early=True), dict(indices=2, intermediates_only=True)]


@pytest.mark.parametrize("kwargs", CALLS, ids=str)
def test_forward_intermediates_match_timm_cait(kwargs, cait_twin):
    ref, ours = cait_twin
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref.forward_intermediates(x, **kwargs), ours.forward_intermediates(x,
                                                                                         **kwargs)
    if kwargs.get("intermediates_only"):
        assert_same_intermediates(expected, got)
        return
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    assert_same_intermediates(expected[1], got[1])
    if kwargs.get("output_fmt", "NCHW") == "NCHW":
        assert got[1][0].shape == (2, 192, 4, 4)
    if not kwargs.get("stop_early"):
        with torch.no_grad():
            torch.testing.assert_close(got[0], ours.forward_features(x))


@pytest.mark.parametrize("kwargs", [*CALLS, dict(return_prefix_tokens=True, indices=2),
                                    dict(return_prefix_tokens=True, output_fmt="NLC")], ids=str)
def test_forward_intermediates_match_timm_vit(kwargs, vit_twin):
    ref, ours = vit_twin
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref.forward_intermediates(x, **kwargs), ours.forward_intermediates(x,
                                                                                         **kwargs)
    if not kwargs.get("intermediates_only"):
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        expected, got = expected[1], got[1]
    assert_same_intermediates(expected, got)
    if kwargs.get("return_prefix_tokens"):
        assert all(isinstance(y, tuple) and y[1].shape == (2, 1, 192) for y in got)


def test_bf16_autocast_logits_match_timm_cait(cait_twin):
    ref, ours = cait_twin
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref(x), ours(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    expected, got = expected.float(), got.float()
    # The two round differently (timm scales q, we fold the scale into the head mix), so
    # they drift apart by a few bf16 ulps of the logit scale over the layers. No top-1 check:
    # with random weights some images have a top-2 margin inside bf16 noise.
    assert (got - expected).abs().max() <= 5e-2 * expected.abs().max()


def test_prune_intermediate_layers_matches_timm():
    ref, ours = timm_twin("cait_xxs24_224", "cait_xxs24_224", img_size=64, depth=4)
    assert ours.prune_intermediate_layers([1]) == ref.prune_intermediate_layers([1]) == [1]
    assert len(ours.blocks) == 2 and not ours.ca_blocks and ours.cls_token is None
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref.forward_intermediates(x, [1]), ours.forward_intermediates(x, [1])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    assert_same_intermediates(expected[1], got[1])


def test_intermediates_of_insert_and_evit_models():
    torch.manual_seed(0)
    model = ImageTransformer(**TINY, class_token="insert", insert_layer=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        pairs = model.forward_intermediates(x, return_prefix_tokens=True,
                                            intermediates_only=True)
    # the class token joins at layer 1: before it there is none to return
    assert [p.shape[1] for _, p in pairs] == [0, 1, 1]
    assert all(y.shape == (2, 32, 4, 4) for y, _ in pairs)

    evit = ImageTransformer(**TINY, keep_rate=0.5, reorg_layers=[1]).eval()
    with torch.no_grad():
        nlc = evit.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert [y.shape[1] for y in nlc] == [16, 8 + 1, 8 + 1]  # kept tokens and the fused one
        assert evit.forward_intermediates(x, indices=[0])[1][0].shape == (2, 32, 4, 4)
        with pytest.raises(ValueError, match="SA layer 1 holds 9 patch tokens after EViT"):
            evit.forward_intermediates(x, indices=[1])
        with pytest.raises(ValueError, match="output_fmt='NHWC' must be"):
            evit.forward_intermediates(x, output_fmt="NHWC")
