"""The FCN module itself: outputs, heads, fusion for inference."""

from __future__ import annotations

import copy

import pytest
import torch

import fcn_zoo
from conftest import tiny_fcn


def test_forward_returns_logits_at_input_size_and_aux_in_training():
    model = tiny_fcn()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 21, 70, 90)
        low = model.forward_features(x)
        assert low.shape == (2, 21, 9, 12)  # output stride 8, rounded up by the padding
    model.train()
    main, aux = model(x)
    assert main.shape == aux.shape == (2, 21, 70, 90)
    assert not torch.equal(main, aux)


def test_channels_are_read_from_timm_feature_info():
    model = fcn_zoo.FCN(num_classes=4, backbone="resnet18", output_stride=16, head_channels=8, aux_channels=None)
    assert model.decode_head[0].in_channels == 512 and model.auxiliary_head is None
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)  # train mode, no aux head: one output


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_classes"):
        fcn_zoo.FCN(num_classes=0)
    with pytest.raises(ValueError, match="output_stride"):
        fcn_zoo.FCN(output_stride=12)
    with pytest.raises(ValueError, match="backbone"):
        fcn_zoo.FCN(backbone="resnet_does_not_exist")
    with pytest.raises(ValueError, match="dataset"):
        fcn_zoo.FCN(dataset="coco")


def test_fuse_folds_every_batchnorm_and_keeps_the_outputs(tmp_path):
    model = tiny_fcn()
    fused = copy.deepcopy(model).fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        assert (fused(x) - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6
    with pytest.raises(RuntimeError, match="fuse"):
        fused.train()
    with pytest.raises(RuntimeError, match="fuse"):
        fused.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
