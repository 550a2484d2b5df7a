"""caitlab-attention: the class token's attention maps, checked against the model's own forward."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from caitlab.analysis.attention_cli import main
from caitlab.analysis.attention_maps import (
    AttentionError,
    attention_maps,
    class_row_attention,
    trace_attention,
    upsample_maps,
)
from caitlab.models import create_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return create_model(name, embed_dim=32, depth=2, **overrides).eval()


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def norm_input(model, x: torch.Tensor) -> torch.Tensor:
    """The tokens forward_features hands to its final norm, caught with a hook."""
    seen = {}
    handle = model.norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        handle.remove()
    return seen["x"]


def attention_io(model, x: torch.Tensor, attn_modules):
    """Each attention module's input and its pre-projection output (the weights times V)."""
    seen: dict = {}
    handles = []
    for key, attn in attn_modules.items():
        handles.append(attn.register_forward_pre_hook(
            lambda _m, args, key=key: seen.setdefault((key, "in"), args[0])))
        handles.append(attn.proj.register_forward_pre_hook(
            lambda _m, args, key=key: seen.setdefault((key, "out"), args[0])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def save_checkpoint(model, path):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "caitlab": {"model_config": model.config}}, path)
    return path


# --- the maps ------------------------------------------------------------------------------


def test_class_attention_maps_per_ca_layer_and_head():
    model = tiny("cait_tiny")
    layers = attention_maps(model, images())
    assert [layer.name for layer in layers] == ["ca.0", "ca.1"]
    assert len(layers) == model.config["ca_depth"]
    heads, tokens = model.blocks[0].attn.num_heads, 1 + 16
    for layer in layers:
        assert layer.weights.shape == (3, heads, tokens)
        assert layer.maps.shape == (3, heads, 4, 4)
        assert (layer.weights >= 0).all()
        torch.testing.assert_close(layer.weights.sum(-1), torch.ones(3, heads))
        torch.testing.assert_close(layer.maps.flatten(2), layer.weights[:, :, 1:])
    assert not model.training


def test_class_token_through_ca_blocks_matches_forward_features():
    model = tiny("cait_tiny")
    x = images()
    trace = trace_attention(model, x)
    expected = norm_input(model, x)
    torch.testing.assert_close(trace.tokens[:, 0], expected[:, 0])
    torch.testing.assert_close(trace.tokens, expected)
    with torch.no_grad():
        torch.testing.assert_close(trace.logits, model(x))


def test_ca_weights_are_what_multiplies_v():
    model = tiny("cait_tiny")
    x = images()
    layers = attention_maps(model, x)
    io = attention_io(model, x, {i: b.attn for i, b in enumerate(model.ca_blocks)})
    for i, (block, layer) in enumerate(zip(model.ca_blocks, layers, strict=True)):
        attn = block.attn
        v = attn._heads(attn.v(io[(i, "in")]))  # (b, h, n, d)
        out = (layer.weights[:, :, None, :] @ v).transpose(1, 2).reshape(3, 1, -1)
        torch.testing.assert_close(out, io[(i, "out")], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("last", [1, 2])
def test_vit_class_row_in_last_layers(last):
    model = tiny("vit_tiny")
    x = images()
    trace = trace_attention(model, x, last_layers=last)
    depth = len(model.blocks)
    assert [layer.name for layer in trace.layers] == [f"sa.{i}"
                                                      for i in range(depth - last, depth)]
    heads = model.blocks[0].attn.num_heads
    for layer in trace.layers:
        assert layer.weights.shape == (3, heads, 17)
        assert layer.maps.shape == (3, heads, 4, 4)
        torch.testing.assert_close(layer.weights.sum(-1), torch.ones(3, heads))
    torch.testing.assert_close(trace.tokens, norm_input(model, x))


@pytest.mark.parametrize("talking_heads", [False, True])
def test_sa_weights_are_what_multiplies_v(talking_heads):
    """Against the layer's own output (SDPA, or the talking-heads path): row 0 of the weights
    times V is the class token's attention output, before the projection."""
    model = tiny("vit_tiny", talking_heads=talking_heads)
    with torch.no_grad():  # talking-heads mixing starts near zero; make it matter
        for block in model.blocks:
            if talking_heads:
                block.attn.proj_l.weight.normal_(0, 0.5)
                block.attn.proj_w.weight.normal_(0, 0.5)
                block.attn.proj_w.bias.normal_(0, 0.1)
    x = images()
    layers = attention_maps(model, x, last_layers=2)
    io = attention_io(model, x, {i: b.attn for i, b in enumerate(model.blocks)})
    for i, layer in zip((0, 1), layers, strict=True):
        attn = model.blocks[i].attn
        u = io[(i, "in")]
        b, n, c = u.shape
        v = attn.qkv(u).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        out = (layer.weights[:, :, None, :] @ v).transpose(1, 2).reshape(b, c)
        torch.testing.assert_close(out, io[(i, "out")][:, 0], atol=1e-5, rtol=1e-4)
        # the full matrix written out by hand, row 0
        qkv = attn.qkv(u).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        full = (qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)
        if talking_heads:
            full = torch.einsum("gh,bhnm->bgnm", attn.proj_l.weight, full)
            full = (full + attn.proj_l.bias[None, :, None, None]).softmax(-1)
            full = torch.einsum("gh,bhnm->bgnm", attn.proj_w.weight, full)
            full = full + attn.proj_w.bias[None, :, None, None]
        else:
            full = full.softmax(-1)
        torch.testing.assert_close(layer.weights, full[:, :, 0])
        torch.testing.assert_close(class_row_attention(attn, u), full[:, :, 0])
    if talking_heads:
        # the mixed weights are not a distribution: documented, and checked here
        sums = torch.stack([layer.weights.sum(-1) for layer in layers])
        assert not torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
    else:
        for layer in layers:
            torch.testing.assert_close(layer.weights.sum(-1), torch.ones(3, 4))


def test_insert_shows_only_layers_with_the_class_token():
    torch.manual_seed(0)
    model = create_model("vit_tiny", embed_dim=32, depth=3, class_token="insert",
                         insert_layer=1).eval()
    x = images(2)
    trace = trace_attention(model, x, last_layers=3)
    assert [layer.name for layer in trace.layers] == ["sa.1", "sa.2"]
    for layer in trace.layers:
        torch.testing.assert_close(layer.weights.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(trace.tokens, norm_input(model, x))


def test_no_class_token_and_bad_last_layers():
    with pytest.raises(AttentionError, match="no class token to visualise"):
        attention_maps(tiny("vit_tiny", class_token="none"), images())
    with pytest.raises(AttentionError, match="at least 1"):
        attention_maps(tiny("vit_tiny"), images(), last_layers=0)


def test_training_mode_is_restored_and_dropout_ignored():
    model = tiny("cait_tiny", attn_drop_rate=0.5, drop_path_rate=0.5).train()
    x = images()
    a = attention_maps(model, x)
    b = attention_maps(model, x)
    assert model.training
    for la, lb in zip(a, b, strict=True):
        torch.testing.assert_close(la.weights, lb.weights)


def test_upsample_to_image_size():
    maps = torch.rand(2, 4, 4, 4)
    assert upsample_maps(maps, (8, 8)).shape == (2, 4, 8, 8)
    near = upsample_maps(maps, (8, 8), "nearest")
    torch.testing.assert_close(near[..., ::2, ::2], maps)


# --- the command ---------------------------------------------------------------------------


def check_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    with Image.open(path) as img:
        img.load()
        assert img.width > 100 and img.height > 100


@pytest.mark.parametrize("name", ["cait_tiny", "vit_tiny"])
def test_end_to_end_digits(tmp_path, capsys, name):
    ckpt = save_checkpoint(tiny(name), tmp_path / "model.ckpt")
    out = tmp_path / "maps"
    assert main([str(ckpt), "--digits", "0", "3", "--out", str(out)]) == 0
    written = [out / "attention_digit0.png", out / "attention_digit3.png"]
    assert sorted(out.iterdir()) == sorted(written)
    for path in written:
        check_png(path)
    printed = capsys.readouterr().out.split()
    assert printed == [str(p) for p in written]


def test_run_folder_and_image_files(tmp_path, capsys):
    model = tiny("cait_tiny", residual="none")  # layerscale_init saved as None
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_checkpoint(model, run / "checkpoints" / "last.ckpt")
    img = tmp_path / "pics" / "seven.png"
    img.parent.mkdir()
    Image.radial_gradient("L").resize((40, 30)).convert("RGB").save(img)
    assert main([str(run), "--images", str(img)]) == 0
    path = run / "attention" / "attention_seven.png"
    assert capsys.readouterr().out.strip() == str(path)
    check_png(path)


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    none_ckpt = save_checkpoint(tiny("vit_tiny", class_token="none"), tmp_path / "none.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    bare = tmp_path / "bare.ckpt"
    torch.save(tiny("vit_tiny").state_dict(), bare)
    good = save_checkpoint(tiny("vit_tiny"), tmp_path / "good.ckpt")
    cases = [
        ([str(none_ckpt), "--digits", "0"], "no class token to visualise"),
        ([str(tmp_path / "missing.ckpt"), "--digits", "0"], "checkpoint not found"),
        ([str(tmp_path), "--digits", "0"], "no checkpoints/best.ckpt"),
        ([str(junk), "--digits", "0"], f"{junk} is not a checkpoint: it is a text file"),
        ([str(bare), "--digits", "0"], "not a caitlab checkpoint"),
        ([str(good), "--digits", "100000"], "out of range"),
        ([str(good), "--images", str(tmp_path / "nope.png")], "image not found"),
        ([str(good), "--images", str(junk)], "not a readable image"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("caitlab-attention: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def run_folder_of(tmp_path, model, data: dict, summary: dict | None = None):
    """A run folder as caitlab-train leaves it: its checkpoint, its resolved config and, where
    given, its summary."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_checkpoint(model, run / "checkpoints" / "best.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def titles_of(monkeypatch) -> list[str]:
    import caitlab.analysis.attention_plot as attention_plot

    titles, plot = [], attention_plot.plot_attention

    def spy(image, layers, index, path, title=None, *args):
        titles.append(title)
        return plot(image, layers, index, path, title, *args)

    monkeypatch.setattr(attention_plot, "plot_attention", spy)
    return titles


@pytest.mark.parametrize("data", [
    {"_target_": "caitlab.data.ImageFolderDataModule", "root": "/data/imagenet"},
    {"_target_": "caitlab.data.Cifar10DataModule", "root": "/data/cifar10"},
])
def test_digits_refused_for_a_run_trained_on_other_data(tmp_path, capsys, data):
    run = run_folder_of(tmp_path, tiny("vit_tiny"), data)
    assert main([str(run), "--digits", "0", "17"]) == 2
    err = capsys.readouterr().err
    option = "imagefolder" if "ImageFolder" in data["_target_"] else "cifar10"
    assert err == (f"caitlab-attention: error: --digits: {run} was trained on data={option}, "
                   "not digits; give its images with --images\n")
    assert not (run / "attention").exists()


def test_digits_follow_the_data_choice_the_summary_records(tmp_path, capsys, monkeypatch):
    """A project's own digits module (``data=digits data._target_=...``): config.yaml names a
    class caitlab does not know, the summary's ``data`` says digits, and digits it is."""
    data = {"_target_": "myproject.data.AugmentedDigits", "val_fraction": 0.1,
            "test_fraction": 0.2}
    run = run_folder_of(tmp_path, tiny("cait_tiny"), data, {"data": "digits"})
    titles = titles_of(monkeypatch)
    assert main([str(run), "--digits", "3"]) == 0, capsys.readouterr().err
    (title,) = titles
    label = title.split("(label ")[1].split(")")[0]
    assert label in [str(i) for i in range(10)]
    assert title.split("predicted ")[1].split()[0] in [str(i) for i in range(10)], title
    check_png(run / "attention" / "attention_digit3.png")


def test_a_projects_own_option_over_caitlabs_digits_takes_digits(tmp_path, capsys, monkeypatch):
    # data=digits_big in a project's conf/data/, a variant of caitlab's digits module
    data = {"_target_": "caitlab.data.DigitsDataModule", "val_fraction": 0.1,
            "test_fraction": 0.2}
    run = run_folder_of(tmp_path, tiny("cait_tiny"), data, {"data": "digits_big"})
    titles_of(monkeypatch)
    assert main([str(run), "--digits", "1"]) == 0, capsys.readouterr().err
    check_png(run / "attention" / "attention_digit1.png")


def test_a_summary_from_before_data_was_recorded_falls_back_to_the_config_class(
        tmp_path, capsys):
    run = run_folder_of(tmp_path, tiny("vit_tiny"),
                        {"_target_": "caitlab.data.SyntheticDataModule"}, {"status": "completed"})
    assert main([str(run), "--digits", "0"]) == 2
    assert capsys.readouterr().err == (
        f"caitlab-attention: error: --digits: {run} was trained on data=synthetic, not digits; "
        "give its images with --images\n")
    assert not (run / "attention").exists()


def test_titles_name_the_image_folder_classes(tmp_path, capsys, monkeypatch):
    root = tmp_path / "pets"
    for split in ("train", "val"):
        for name in ("cat", "dog", ".hidden"):
            (root / split / name).mkdir(parents=True)
    model = tiny("cait_tiny", in_chans=3, num_classes=2)
    run = run_folder_of(tmp_path, model, {"_target_": "caitlab.data.ImageFolderDataModule",
                                          "root": str(root)})
    img = tmp_path / "photo.png"
    Image.radial_gradient("L").convert("RGB").save(img)
    titles = titles_of(monkeypatch)
    assert main([str(run), "--images", str(img)]) == 0
    (title,) = titles
    assert title.startswith("photo: predicted ") and title.split()[2] in ("cat", "dog"), title
    check_png(run / "attention" / "attention_photo.png")


def test_titles_name_cifar_classes_and_digits_keep_theirs(tmp_path, capsys, monkeypatch):
    import pickle

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    meta = tmp_path / "cifar10" / "cifar-10-batches-py" / "batches.meta"
    meta.parent.mkdir(parents=True)
    meta.write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}))
    model = tiny("vit_tiny", in_chans=3, img_size=32, patch_size=8)
    run = run_folder_of(tmp_path, model, {"_target_": "caitlab.data.Cifar10DataModule",
                                          "root": str(meta.parent.parent)})
    img = tmp_path / "x.png"
    Image.radial_gradient("L").convert("RGB").save(img)
    titles = titles_of(monkeypatch)
    assert main([str(run), "--images", str(img), "--out", str(tmp_path / "a")]) == 0
    assert titles[-1].split()[2] in names, titles

    digits = run_folder_of(tmp_path / "d", tiny("cait_tiny"),
                           {"_target_": "caitlab.data.DigitsDataModule", "val_fraction": 0.1,
                            "test_fraction": 0.2})
    assert main([str(digits), "--digits", "3"]) == 0
    assert titles[-1].startswith("digit3 (label ") and "predicted " in titles[-1]
    label = titles[-1].split("(label ")[1].split(")")[0]
    assert label in [str(i) for i in range(10)]


def test_a_model_without_head_predicts_nothing(tmp_path, capsys, monkeypatch):
    """num_classes=0: the head is the identity, its output features, not class scores."""
    ckpt = save_checkpoint(tiny("cait_tiny", num_classes=0), tmp_path / "model.ckpt")
    titles = titles_of(monkeypatch)
    assert main([str(ckpt), "--digits", "3", "--out", str(tmp_path / "maps")]) == 0
    (title,) = titles
    assert title.startswith("digit3 (label ") and "predicted" not in title, title
    check_png(tmp_path / "maps" / "attention_digit3.png")
