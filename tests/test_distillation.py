"""Distillation: DeiT's distillation token as a model axis (where it sits, what it costs, what it
refuses), the soft and hard losses against hand computations, the teacher, and training."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from caitlab.config import ConfigError, DistillationConfig, TrainConfig
from caitlab.models import ImageTransformer, ModelConfigError, count_params, create_model
from caitlab.training.distillation import (
    DistillationLoss,
    hard_distillation,
    load_teacher,
    soft_distillation,
)
from caitlab.training.module import ClassificationModule

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


# --- the losses against hand computations --------------------------------------------------

STUDENT = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
TEACHER = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, -1.0]])


def _softmax(row, tau):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_soft_distillation_by_hand():
    tau = 2.0
    total = 0.0
    for s, t in zip(STUDENT.tolist(), TEACHER.tolist(), strict=True):
        ps, pt = _softmax(s, tau), _softmax(t, tau)
        total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt, strict=True))
    expected = total * tau * tau / STUDENT.numel()  # DeiT: summed KL / (batch x classes)
    assert soft_distillation(STUDENT, TEACHER, tau).item() == pytest.approx(expected, rel=1e-6)
    assert soft_distillation(TEACHER, TEACHER, tau).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_distillation_by_hand():
    # the teacher's argmax: class 0 (a tie between 0 and 1 goes to the first), then class 1
    expected = (-math.log(_softmax(STUDENT[0].tolist(), 1)[0])
                - math.log(_softmax(STUDENT[1].tolist(), 1)[1])) / 2
    assert hard_distillation(STUDENT, TEACHER).item() == pytest.approx(expected, rel=1e-6)


def test_the_loss_mixes_base_and_teacher_by_alpha_and_heads_by_role():
    labels = torch.tensor([2, 0])
    base = torch.nn.CrossEntropyLoss()
    dist_head = STUDENT.flip(1)
    loss = DistillationLoss(base, "hard", alpha=0.25, tau=1.0)
    expected = 0.75 * base(STUDENT, labels) + 0.25 * hard_distillation(dist_head, TEACHER)
    # with a distillation token: the class head learns the labels, the other the teacher
    assert loss((STUDENT, dist_head), labels, TEACHER).item() == pytest.approx(expected.item())
    # without one: the only head learns both
    single = 0.75 * base(STUDENT, labels) + 0.25 * hard_distillation(STUDENT, TEACHER)
    assert loss(STUDENT, labels, TEACHER).item() == pytest.approx(single.item())
    assert DistillationLoss(base, "none", 0.5, 1.0)(STUDENT, labels, None).item() == \
        pytest.approx(base(STUDENT, labels).item())


def test_distillation_config_is_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="distillation.type='sfot'.*did you mean soft"):
        DistillationConfig(type="sfot").validate()
    with pytest.raises(ConfigError, match="distillation.type=hard needs distillation.teacher"):
        DistillationConfig(type="hard").validate()
    with pytest.raises(ConfigError, match=r"distillation.alpha=1.5 is not allowed"):
        DistillationConfig(alpha=1.5).validate()


# --- the teacher --------------------------------------------------------------------------


def _caitlab_checkpoint(path, name="cait_tiny", **kwargs):
    """A checkpoint as caitlab-train writes it (Lightning's state dict, the model config)."""
    torch.manual_seed(1)
    model = create_model(name, embed_dim=16, depth=1, **kwargs)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "caitlab": {"model_config": model.config}}, path)
    return model.eval()


def test_a_caitlab_checkpoint_teacher_is_frozen_and_predicts_as_saved(tmp_path):
    saved = _caitlab_checkpoint(tmp_path / "best.ckpt")
    teacher = load_teacher(DistillationConfig("soft", teacher=str(tmp_path / "best.ckpt")),
                           1, 10, 8)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(teacher(x), saved(x))


def test_a_timm_teacher_reads_local_weights_only(tmp_path):
    import timm

    kwargs = {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2}
    torch.manual_seed(2)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1,
                            num_classes=10, **kwargs).eval()
    torch.save(ref.state_dict(), tmp_path / "teacher.pth")
    cfg = DistillationConfig("hard", teacher="vit_tiny_patch16_224",
                             teacher_weights=str(tmp_path / "teacher.pth"), teacher_kwargs=kwargs)
    teacher = load_teacher(cfg, 1, 10, 8)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(teacher(x), ref(x))
    with pytest.raises(ConfigError, match="set distillation.teacher_weights to a local file"):
        load_teacher(DistillationConfig("hard", teacher="vit_tiny_patch16_224"), 1, 10, 8)
    with pytest.raises(ConfigError, match="neither a file or run folder nor a timm model name"):
        load_teacher(DistillationConfig("hard", teacher="regnety_16gf"), 1, 10, 8)
    with pytest.raises(ConfigError, match="teacher.pth does not fit timm's vit_tiny_patch16_224"):
        load_teacher(cfg, 1, 7, 8)  # its head has 10 classes
    _caitlab_checkpoint(tmp_path / "ten.ckpt")
    with pytest.raises(ConfigError, match="predicts \\(10,\\) outputs, the data has 7 classes"):
        load_teacher(DistillationConfig("soft", teacher=str(tmp_path / "ten.ckpt")), 1, 7, 8)


def test_training_with_a_teacher_leaves_it_out_of_the_state_and_logs_both_heads(tmp_path):
    from caitlab.data import DigitsDataModule

    _caitlab_checkpoint(tmp_path / "teacher.ckpt")
    cfg = TrainConfig(distillation=DistillationConfig("hard", teacher=str(tmp_path /
                                                                         "teacher.ckpt")))
    teacher = load_teacher(cfg.distillation, 1, 10, 8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    student = create_model("vit_tiny", embed_dim=16, depth=1, distillation_token=True)
    module = ClassificationModule(student, num_classes=10, cfg=cfg, batch_size=32,
                                  teacher=teacher)
    assert not any(k.startswith("teacher") for k in module.state_dict())
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, img_size=8))
    metrics = trainer.callback_metrics
    assert {"val/top1", "val/top1_cls", "val/top1_dist"} <= set(metrics)
    # the teacher did not learn and stayed in eval mode
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not teacher.training


@pytest.mark.slow
def test_caitlab_train_distils_from_a_run_checkpoint(tmp_path):
    import csv
    import json

    from conftest import caitlab_train

    _caitlab_checkpoint(tmp_path / "teacher.ckpt")
    caitlab_train(tmp_path, "model=vit_tiny", "model.embed_dim=16", "model.depth=1",
                  "model/dist_token=on", "distillation=hard",
                  f"distillation.teacher={tmp_path / 'teacher.ckpt'}", "trainer=debug",
                  "logger=csv", "name=student")
    (run,) = [p.parent for p in (tmp_path / "student").glob("*/summary.json")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["teacher"] == {"source": str(tmp_path / "teacher.ckpt"),
                                  "name": "teacher.ckpt",  # a file outside any run folder
                                  "type": "hard", "alpha": 0.5, "tau": 1.0,
                                  "params": 7362}  # cait_tiny at 16 wide
    assert summary["axes"]["distillation_token"] is True
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val/top1_dist") for r in rows) and any(r.get("test/top1_cls")
                                                            for r in rows)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("teacher") for k in state) and "model.dist_token" in state
