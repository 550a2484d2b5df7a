"""Checkpoint compatibility with timm and the official DeiT/CaiT release format.

Reference models are built locally with timm (``pretrained=False``, no network).
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from caitlab.models import CheckpointError, create_model, load_checkpoint


def _perturbed_timm(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, **kwargs).eval()
    # Random init leaves LayerScale at 1e-5 and the head-mixing near identity-free noise;
    # make every parameter matter so a wrong mapping cannot hide.
    with torch.no_grad():
        for name_, p in ref.named_parameters():
            if "gamma" in name_ or "ls" in name_:
                p.copy_(torch.randn_like(p) * 0.2)
            elif p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return ref


@pytest.fixture(scope="module")
def timm_cait():
    return _perturbed_timm("cait_xxs24_224")


@pytest.fixture(scope="module")
def timm_deit():
    return _perturbed_timm("deit_tiny_patch16_224")


def _logits_diff(ours, ref, size=224):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours.eval()(x) - ref(x)).abs().max().item()


def test_timm_cait_weights_give_equal_logits(tmp_path, timm_cait):
    path = tmp_path / "cait.pth"
    torch.save(timm_cait.state_dict(), path)
    ours = load_checkpoint(create_model("cait_xxs24_224"), path)
    assert _logits_diff(ours, timm_cait) < 1e-5


def test_timm_deit_weights_give_equal_logits(tmp_path, timm_deit):
    path = tmp_path / "deit.pth"
    torch.save(timm_deit.state_dict(), path)
    ours = load_checkpoint(create_model("deit_tiny_patch16_224"), path)
    assert _logits_diff(ours, timm_deit) < 1e-5


def test_timm_distilled_deit_gives_equal_logits_from_both_heads(tmp_path):
    ref = _perturbed_timm("deit_tiny_distilled_patch16_224")
    path = tmp_path / "deit_distilled.pth"
    torch.save(ref.state_dict(), path)
    ours = load_checkpoint(create_model("deit_tiny_distilled_patch16_224"), path)
    assert _logits_diff(ours, ref) < 1e-5  # eval: the mean of the two heads
    # in a distilled training each head on its own
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ref.set_distilled_training(True)
    ours.set_distilled_training(True)
    ref.train(), ours.train()  # no dropout or drop-path in the tiny DeiT: deterministic
    with torch.no_grad():
        (cls, dist), (ref_cls, ref_dist) = ours(x), ref(x)
    assert (cls - ref_cls).abs().max() < 1e-5 and (dist - ref_dist).abs().max() < 1e-5
    assert (cls - dist).abs().max() > 1e-3  # two heads, not one twice
    ours.eval()
    with torch.no_grad():
        heads = ours.forward_heads(x)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(heads, (cls, dist), strict=True))


def test_timm_vit_with_layerscale_loads(tmp_path):
    ref = _perturbed_timm("vit_tiny_patch16_224", init_values=1e-5)
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    ours = load_checkpoint(
        create_model("deit_tiny_patch16_224", residual="layerscale", layerscale_init=1e-5), path
    )
    assert _logits_diff(ours, ref) < 1e-5


def test_official_release_format_with_module_prefix(tmp_path, timm_cait):
    path = tmp_path / "official.pth"
    sd = {f"module.{k}": v for k, v in timm_cait.state_dict().items()}
    torch.save({"model": sd, "epoch": 399, "args": {"lr": 1e-3}}, path)
    ours = load_checkpoint(create_model("cait_xxs24_224"), path)
    assert _logits_diff(ours, timm_cait) < 1e-5


def test_position_embedding_is_resampled_to_a_new_image_size(tmp_path, timm_cait):
    path = tmp_path / "cait224.pth"
    torch.save(timm_cait.state_dict(), path)
    ours = load_checkpoint(create_model("cait_xxs24_224", img_size=288), path)
    expected = resample_abs_pos_embed(timm_cait.pos_embed.detach(), [18, 18], [14, 14],
                                      num_prefix_tokens=0)
    torch.testing.assert_close(ours.pos_embed.detach(), expected)
    torch.testing.assert_close(ours.blocks[3].attn.qkv.weight, timm_cait.blocks[3].attn.qkv.weight)
    assert torch.isfinite(ours(torch.randn(1, 3, 288, 288))).all()


def test_deit_position_embedding_resampled_with_class_position_folded(tmp_path, timm_deit):
    path = tmp_path / "deit.pth"
    torch.save(timm_deit.state_dict(), path)
    ours = load_checkpoint(create_model("deit_tiny_patch16_224", img_size=160), path)
    assert ours.pos_embed.shape == (1, 100, 192)
    pos = timm_deit.pos_embed.detach()
    torch.testing.assert_close(ours.cls_token.detach(), timm_deit.cls_token.detach() + pos[:, :1])


@pytest.mark.parametrize("content,message", [
    # torch.load's own error for these is KeyError: '101' and 'Unsupported operand 110'
    (b"hello world\n", "is not a checkpoint: it is a text file (starting 'hello world')"),
    (b"this is not a checkpoint\n", "is not a checkpoint: it is a text file (starting 'this is "
                                    "not a checkpoint')"),
    (b"", "is not a checkpoint: the file is empty"),
    (bytes(range(256)), "is not a checkpoint: torch.save writes a zip archive or a pickle, "
                       "it is neither"),
])
def test_file_that_is_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create_model("cait_tiny"), path)
    assert str(err.value) == f"{path} {message}"


def test_torn_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create_model("cait_tiny"), path)
    assert str(err.value).startswith(f"{path} is not a readable checkpoint (torn or corrupt?): ")
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nowhere.pth"):
        load_checkpoint(create_model("cait_tiny"), tmp_path / "nowhere.pth")


def test_checkpoint_of_another_architecture_is_refused_whole(tmp_path, timm_cait):
    path = tmp_path / "cait.pth"
    torch.save(timm_cait.state_dict(), path)
    deit = create_model("deit_tiny_patch16_224")
    before = {k: v.clone() for k, v in deit.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(deit, path)
    message = str(err.value)
    assert "does not fit ImageTransformer" in message and "324 unexpected" in message
    assert "unexpected blocks.0.ls1.gamma" in message and "\n" not in message
    # nothing was half-loaded: even tensors whose names and shapes agree are untouched
    for k, v in deit.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_width_names_the_mismatching_shape(tmp_path, timm_deit):
    path = tmp_path / "deit.pth"
    torch.save(timm_deit.state_dict(), path)
    expected = r"patch_embed.proj.weight \(192, 3, 16, 16\) vs model \(384"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(create_model("deit_small_patch16_224"), path)


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth is not a readable checkpoint: it holds a "
                                              r"Python object \(print\) that loading would run"):
        load_checkpoint(create_model("cait_tiny"), path)


def test_checkpoint_of_a_compiled_run_loads(tmp_path):
    """A ``compile=true`` run trains ``torch.compile(model)``, whose state dict names every
    key ``_orig_mod.<key>``; its Lightning checkpoint must load for ``finetune_from`` and
    caitlab-attention alike."""
    from caitlab.analysis.attention_data import load_model
    from caitlab.training.module import ClassificationModule

    torch.manual_seed(0)
    trained = create_model("cait_tiny")
    module = ClassificationModule(trained, num_classes=10)
    module.model = torch.compile(module.model)  # as caitlab.train does; compiled lazily
    state = module.state_dict()
    assert "model._orig_mod.cls_token" in state
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "caitlab": {"model_config": trained.config}}, path)
    torch.manual_seed(1)
    for loaded in (load_checkpoint(create_model("cait_tiny"), path), load_model(path)[0]):
        for key, value in trained.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
