"""Parity with the reference implementation (sssegmentation): same weights, same logits, same labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fcn_zoo
from conftest import PHOTOS
from reference import build_reference_fcn, reference_logits, reference_low_res_logits, save_reference_checkpoint


@pytest.mark.parametrize("depth,output_stride", [(50, 8), (50, 16), (101, 8), (101, 16)])
def test_converted_reference_checkpoint_gives_reference_logits(tmp_path, depth, output_stride):
    reference = build_reference_fcn(depth, output_stride, num_classes=21, seed=depth + output_stride)
    # scale the classifier up so that the logits are large and a small mapping error would show
    reference.decoder[-1].weight.data.mul_(50)
    pth = save_reference_checkpoint(reference, tmp_path / f"fcn_resnet{depth}os{output_stride}_voc.pth")

    model = fcn_zoo.from_pretrained(pth)

    assert not model.training
    x = torch.randn(2, 3, 67, 93, generator=torch.Generator().manual_seed(1))  # odd sizes exercise padding
    expected = reference_logits(reference, x)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape == (2, 21, 67, 93)
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() < 1e-4


def test_auxiliary_head_matches_reference(tmp_path):
    reference = build_reference_fcn(50, 16, num_classes=19, seed=3)
    pth = save_reference_checkpoint(reference, tmp_path / "fcn_resnet50os16_cityscapes.pth")
    model = fcn_zoo.from_pretrained(pth)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = reference.transforminputs(reference.backbone_net(x), selected_indices=(2, 3))
        expected = reference.auxiliary_decoder(features[0])
        got = model.auxiliary_head(model.backbone(x)[0])
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("photo", PHOTOS[:2], ids=lambda p: p.name)
def test_predict_follows_the_reference_evaluation_protocol(tmp_path, photo):
    """predict() labels == the reference test pipeline (cv2 resize, normalise, forward, upsample, argmax)."""
    import cv2
    from ssseg.modules.datasets.pipelines.transforms import Normalize, Resize

    reference = build_reference_fcn(50, 16, num_classes=21, seed=7)
    reference.decoder[-1].weight.data.mul_(50)
    pth = save_reference_checkpoint(reference, tmp_path / "fcn_resnet50os16_voc.pth")
    model = fcn_zoo.from_pretrained(pth)

    bgr = cv2.imread(str(photo))  # the reference reads with OpenCV (BGR) and converts in Normalize
    sample = Resize(output_size=(2048, 512), keep_ratio=True, scale_range=None)({"image": bgr})
    sample = Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])(sample)
    x = torch.from_numpy(sample["image"].transpose(2, 0, 1).copy()).unsqueeze(0)
    logits = F.interpolate(reference_low_res_logits(reference, x), size=bgr.shape[:2], mode="bilinear", align_corners=False)
    expected = logits[0].argmax(0).numpy()

    seg = model.predict(photo)

    assert seg.labels.shape == bgr.shape[:2]
    assert len(np.unique(expected)) > 1  # a test where every pixel has one class would prove nothing
    # PIL and OpenCV decode JPEG with slightly different IDCTs, so a few border pixels may flip
    assert (seg.labels == expected).mean() > 0.995


def test_tta_is_the_references_multi_scale_and_flip(tmp_path):
    """TTA's logits == the reference's ``auginference`` (scales 0.5-1.75 of the resized image, each flipped) merged
    as its test.py merges them (each upsampled to the image's size, averaged), and predict(tta=True)'s labels
    their argmax."""
    from fcn_zoo.protocol import TTA, network_logits, prepare
    from fcn_zoo.images import read_image

    reference = build_reference_fcn(50, 16, num_classes=21, seed=7)
    reference.decoder[-1].weight.data.mul_(50)
    model = fcn_zoo.from_pretrained(save_reference_checkpoint(reference, tmp_path / "fcn_resnet50os16_voc.pth"))
    tta = TTA()
    reference.cfg["inference"] = {"forward": {"mode": "whole"}, "tta": {
        "multiscale": list(tta.scales), "flip": tta.flip, "use_probs_before_resize": False}}
    reference.cfg["dataset"] = {"train": {"data_pipelines": [("RandomFlip", {"prob": 0.5})]}}  # no class pairs to swap

    rgb = read_image(PHOTOS[0])
    size = rgb.shape[:2]
    x = prepare(model, rgb)  # the same input for both: the resized, normalised image
    with torch.no_grad():
        theirs = reference.auginference(x.contiguous())
        ours = network_logits(model, [x], tta=tta)[0]
    assert len(ours) == len(theirs) == 12

    def merged(logits):
        return sum(F.interpolate(lg.float(), size=size, mode="bilinear", align_corners=False) for lg in logits) / len(logits)

    expected, got = merged(theirs), merged(ours)
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() < 1e-3
    labels = model.predict(rgb, tta=True).labels
    assert len(np.unique(labels)) > 1 and (labels == expected[0].argmax(0).numpy()).mean() > 0.9999


def test_dataset_metadata_matches_the_reference():
    from ssseg.modules.datasets.ade20k import ADE20kDataset
    from ssseg.modules.datasets.cityscapes import CityScapesDataset
    from ssseg.modules.datasets.voc import VOCDataset

    for ours, theirs in [("voc", VOCDataset), ("ade20k", ADE20kDataset), ("cityscapes", CityScapesDataset)]:
        info = fcn_zoo.DATASETS[ours]
        assert [tuple(c) for c in info.palette] == [tuple(c) for c in theirs.palette]
        names = list(theirs.classnames)
        if ours == "voc":
            names[0] = "background"  # the reference's '__background__'
        assert list(info.classes) == names
