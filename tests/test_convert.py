"""fcn-zoo convert: torchvision, mmsegmentation and reference layouts, strict and safe."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import fcn_zoo
from conftest import randomize_batchnorm
from fcn_zoo.cli import main
from fcn_zoo.convert import convert_state_dict


@pytest.mark.parametrize("arch", ["fcn_resnet50", "fcn_resnet101"])
def test_torchvision_fcn_converts_with_equal_logits(tmp_path, capsys, arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models.segmentation, arch)(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    randomize_batchnorm(tv).eval()
    torch.save(tv.state_dict(), tmp_path / f"{arch}.pth")

    code = main(["convert", str(tmp_path / f"{arch}.pth"), "--from", "torchvision", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    model = fcn_zoo.from_pretrained(tmp_path / "out")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["backbone"] == arch.removeprefix("fcn_") and config["num_convs"] == 1 and config["aux_channels"] == 256
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        expected = tv(x)["out"]
        assert (model(x) - expected).abs().max() < 1e-4
        fused = model.fuse(inplace=False)  # the fast path: float rounding only
        assert (fused(x) - expected).abs().max() < 1e-4 * expected.abs().max()
        # the auxiliary heads agree too
        aux = model.auxiliary_head(model.backbone(x)[0])
        assert (aux - tv.aux_classifier(tv.backbone(x)["aux"])).abs().max() < 1e-4
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["parity"]["implementation"].startswith("torchvision")
    assert provenance["parity"]["max_abs_diff"] < 1e-4 and provenance["parity"]["label_agreement"] == 1.0
    assert "1.00" in capsys.readouterr().out


def _mmseg_state_dict(num_classes: int = 19) -> dict[str, torch.Tensor]:
    """An mmsegmentation FCN R-50-D8 state dict, keys as mmseg names them (ResNetV1c stem, concat-input head)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, value in timm.create_model("resnet50c", features_only=True, out_indices=(3, 4)).state_dict().items():
        key = key.replace("conv1.", "stem.", 1) if key.startswith("conv1.") else key.replace("bn1.", "stem.7.", 1) if key.startswith("bn1.") else key
        sd[f"backbone.{key}"] = torch.randn(value.shape, generator=g) * 0.05 if value.is_floating_point() else value

    def conv_module(prefix, cin, cout):
        sd[f"{prefix}.conv.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.02
        sd[f"{prefix}.bn.weight"] = torch.rand(cout, generator=g) + 0.5
        sd[f"{prefix}.bn.bias"] = torch.randn(cout, generator=g) * 0.1
        sd[f"{prefix}.bn.running_mean"] = torch.randn(cout, generator=g) * 0.1
        sd[f"{prefix}.bn.running_var"] = torch.rand(cout, generator=g) + 0.5
        sd[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(100)

    conv_module("decode_head.convs.0", 2048, 512)
    conv_module("decode_head.convs.1", 512, 512)
    conv_module("decode_head.conv_cat", 2048 + 512, 512)
    sd["decode_head.conv_seg.weight"] = torch.randn(num_classes, 512, 1, 1, generator=g)
    sd["decode_head.conv_seg.bias"] = torch.randn(num_classes, generator=g)
    conv_module("auxiliary_head.convs.0", 1024, 256)
    sd["auxiliary_head.conv_seg.weight"] = torch.randn(num_classes, 256, 1, 1, generator=g)
    sd["auxiliary_head.conv_seg.bias"] = torch.randn(num_classes, generator=g)
    return sd


def _mmseg_head_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """mmsegmentation's FCNHead forward (eval), written out with functional ops."""
    def conv_module(prefix, t):
        t = F.conv2d(t, sd[f"{prefix}.conv.weight"], padding=1)
        t = F.batch_norm(t, sd[f"{prefix}.bn.running_mean"], sd[f"{prefix}.bn.running_var"],
                         sd[f"{prefix}.bn.weight"], sd[f"{prefix}.bn.bias"], training=False)
        return F.relu(t)

    y = conv_module("decode_head.convs.1", conv_module("decode_head.convs.0", x))
    y = conv_module("decode_head.conv_cat", torch.cat([x, y], dim=1))
    return F.conv2d(y, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


def test_mmseg_layout_converts_with_every_key_used(tmp_path, capsys):
    sd = _mmseg_state_dict()
    torch.save({"meta": {"CLASSES": ["road"] * 19, "epoch": 80}, "state_dict": sd}, tmp_path / "fcn_r50-d8_512x1024_80k_cityscapes.pth")

    config, converted = convert_state_dict(sd, "mmseg", name="fcn_r50-d8_512x1024_80k_cityscapes.pth")
    assert len(converted) == len(sd)
    assert config == {
        "num_classes": 19, "backbone": "resnet50c", "output_stride": 8, "head_channels": 512, "num_convs": 2,
        "concat_input": True, "aux_channels": 256, "dataset": "cityscapes",
    }

    code = main(["convert", str(tmp_path / "fcn_r50-d8_512x1024_80k_cityscapes.pth"), "--from", "mmseg", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    model = fcn_zoo.from_pretrained(tmp_path / "out")  # strict: nothing missing, nothing left over
    features = torch.randn(1, 2048, 9, 11)
    with torch.no_grad():
        assert (model.decode_head(features) - _mmseg_head_forward(sd, features)).abs().max() < 1e-4
    assert model.class_names[0] == "road"


def test_a_pickle_with_a_code_payload_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "fcn_resnet50os8_voc.pth", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    torch.save({"model": Payload()}, tmp_path / "zipped.pth")

    with open(tmp_path / "fcn_resnet50os8_voc.pth", "rb") as f:
        pickle.load(f)  # proof that the payload runs when a pickle is loaded carelessly
    assert marker.exists()
    marker.unlink()

    for evil in ("fcn_resnet50os8_voc.pth", "zipped.pth"):
        with pytest.raises(fcn_zoo.WeightsError, match="no code in it ran"):
            fcn_zoo.from_pretrained(tmp_path / evil)
        code = main(["convert", str(tmp_path / evil), "--from", "reference", "--out", str(tmp_path / "out")])
        assert code == 1 and "no code in it ran" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_extra_or_missing_keys_and_a_wrong_row_are_errors(tmp_path, capsys):
    tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    sd = tv.state_dict()
    sd["classifier.9.weight"] = torch.zeros(1)
    del sd["backbone.layer2.0.bn1.bias"]
    torch.save(sd, tmp_path / "tv.pth")
    code = main(["convert", str(tmp_path / "tv.pth"), "--from", "torchvision", "--out", str(tmp_path / "tv")])
    err = capsys.readouterr().err
    assert code == 1 and "decode_head.9.weight" in err and "backbone.layer2.0.bn1.bias" in err
    assert not (tmp_path / "tv").exists()
    with pytest.raises(fcn_zoo.WeightsError, match="unknown keys head.0.weight"):
        convert_state_dict({"head.0.weight": torch.zeros(1)}, "torchvision")
    torch.save({"model": {"backbone_net.stem.0.weight": torch.zeros(32, 3, 3, 3)}}, tmp_path / "partial_os8.pth")
    code = main(["convert", str(tmp_path / "partial_os8.pth"), "--from", "reference", "--out", str(tmp_path / "o")])
    assert code == 1 and "layer3" in capsys.readouterr().err

    (tmp_path / "exists").mkdir()
    code = main(["convert", str(tmp_path / "partial_os8.pth"), "--from", "reference", "--out", str(tmp_path / "exists")])
    assert code == 1 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["2021", "2023-legacy-serialisation"])
def test_reference_files_with_their_optimizer_state_load(tmp_path, layout):
    """The published files hold the SGD momentum buffers beside the model (about twice the weights' size)."""
    from reference import build_reference_fcn, reference_logits

    reference = build_reference_fcn(50, 16, num_classes=21, seed=4)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for p in reference.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # fills the momentum buffers
    with torch.no_grad():
        for p in reference.parameters():
            p.grad = None
    path = tmp_path / "fcn_resnet50os16_voc.pth"
    if layout == "2021":
        torch.save({"epoch": 60, "model": reference.state_dict(), "optimizer": optimizer.state_dict()}, path)
    else:
        torch.save({"cur_epoch": 60, "cur_iter": 39660, "optimizer": optimizer.state_dict(), "model": reference.state_dict()},
                   path, _use_new_zipfile_serialization=False)
    weights = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    assert path.stat().st_size > 1.8 * weights
    model = fcn_zoo.from_pretrained(path)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert (model(x) - reference_logits(reference, x)).abs().max() < 1e-4


def test_a_refused_pickle_names_the_type_it_refused(tmp_path, capsys):
    import argparse

    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.01)}, tmp_path / "with_args.pth")
    with pytest.raises(fcn_zoo.WeightsError) as e:
        fcn_zoo.from_pretrained(tmp_path / "with_args.pth")
    assert "Unsupported global" in str(e.value) and "argparse.Namespace" in str(e.value)
    assert "\n" not in str(e.value)


def test_the_wrong_layout_says_which_layout_the_keys_look_like(tmp_path, capsys):
    tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    torch.save(tv.state_dict(), tmp_path / "fcn_resnet50_coco.pth")
    code = main(["convert", str(tmp_path / "fcn_resnet50_coco.pth"), "--from", "reference", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "look like the torchvision layout" in err and "--from torchvision" in err
    torch.save({"state_dict": _mmseg_state_dict()}, tmp_path / "fcn_r50-d8.pth")
    code = main(["convert", str(tmp_path / "fcn_r50-d8.pth"), "--from", "torchvision", "--out", str(tmp_path / "out")])
    assert code == 1 and "look like the mmseg layout" in capsys.readouterr().err
    # handed to predict, which reads reference files, a torchvision file points to fcn-zoo convert
    from conftest import PHOTOS

    code = main(["predict", str(tmp_path / "fcn_resnet50_coco.pth"), str(PHOTOS[0]), "--out", str(tmp_path / "masks")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "fcn-zoo convert" in err and "--from torchvision" in err


def test_every_converted_folder_has_a_card_and_describes_itself(tmp_path, capsys):
    from huggingface_hub import ModelCard

    tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    torch.save(tv.state_dict(), tmp_path / "fcn_resnet50_coco.pth")
    assert main(["convert", str(tmp_path / "fcn_resnet50_coco.pth"), "--from", "torchvision", "--out", str(tmp_path / "out")]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "fcn-zoo" and "| 15 | person |" in card.text
    assert "torchvision" in card.text and json.loads((tmp_path / "out" / "provenance.json").read_text())["weights_sha256"] in card.text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["class_names"][15] == "person" and config["eval_size"] == [2048, 512] and len(config["palette"]) == 21


def test_a_checkpoint_saved_from_ddp_converts_with_parity_and_a_non_torch_file_says_its_error(tmp_path, capsys):
    pytest.importorskip("ssseg", reason="the reference implementation (the test extra)")
    from reference import build_reference_fcn

    reference = build_reference_fcn(50, 16, num_classes=21, seed=3)
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "ddp_os16.pth")
    assert main(["convert", str(tmp_path / "ddp_os16.pth"), "--from", "reference", "--out", str(tmp_path / "out")]) == 0
    assert "max abs logit difference" in capsys.readouterr().out
    (tmp_path / "hello.pth").write_bytes(b"hello")
    assert main(["convert", str(tmp_path / "hello.pth"), "--from", "torchvision", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "not a checkpoint of plain tensors (" in err and "Error" in err.split("not a checkpoint of plain tensors (")[1]


def test_torchvision_weights_get_vocs_classes_but_no_claim_of_voc_training():
    """torchvision's FCN weights predict VOC's 20 classes but were trained on a COCO subset (COCO_WITH_VOC_LABELS_V1)."""
    from fcn_zoo.cards import model_card

    tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    config, _ = convert_state_dict(tv.state_dict(), "torchvision", name="fcn_resnet50_coco-1167a1af.pth")
    voc = fcn_zoo.DATASETS["voc"]
    assert "dataset" not in config and config["class_names"] == list(voc.classes) and config["eval_size"] == list(voc.eval_size)
    card = model_card(fcn_zoo.FCN(**config).hub_config())
    assert voc.title not in str(card) and "trained on" not in str(card) and card.data.datasets is None


def test_mmseg_file_names_give_their_dataset_before_the_date_and_hash():
    config, _ = convert_state_dict(_mmseg_state_dict(), "mmseg",
                                   name="fcn_r50-d8_512x1024_40k_cityscapes_20200604_192608-efe53f0d.pth")
    assert config["dataset"] == "cityscapes"
