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


def _bottleneck_fcn() -> fcn_zoo.FCN:
    from conftest import randomize_batchnorm

    torch.manual_seed(0)
    model = fcn_zoo.FCN(num_classes=5, backbone="resnet50c", output_stride=8, head_channels=16, aux_channels=8)
    return randomize_batchnorm(model).eval()


@pytest.mark.parametrize("make", [tiny_fcn, _bottleneck_fcn], ids=["basicblock", "bottleneck"])
def test_fuse_runs_relu_and_residual_inside_the_convolutions(make):
    from fcn_zoo._fusion import ConvAct, FusedBottleneck, onednn_available

    model = make()
    fused = copy.deepcopy(model).fuse()
    on_path = [m for name, m in fused.named_modules() if not name.startswith("auxiliary_head")]
    assert not any(type(m) is torch.nn.ReLU for m in on_path)  # every ReLU became a post-op
    assert not any(type(m).__module__.startswith("timm.") and type(m).__name__ in ("Bottleneck", "BasicBlock") for m in on_path)
    assert sum(isinstance(m, FusedBottleneck) for m in on_path) == (8 if make is tiny_fcn else 16)
    assert sum(isinstance(m, ConvAct) and m.residual for m in on_path) == sum(isinstance(m, FusedBottleneck) for m in on_path)

    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        expected = model(x)
    tol = 1e-5 * expected.abs().max() + 1e-6
    with torch.inference_mode():  # oneDNN's fused kernels, NCHW and channels_last
        assert (fused(x) - expected).abs().max() <= tol
        assert (fused(x.contiguous(memory_format=torch.channels_last)) - expected).abs().max() <= tol
    # with autograd on the input the same layers run as conv2d + relu; gradients reach the input
    x_grad = x.clone().requires_grad_(True)
    out = fused(x_grad)
    assert (out.detach() - expected).abs().max() <= tol
    out.square().mean().backward()
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0
    assert onednn_available()  # the CPU wheel this project tests with has them; without, the fallback runs


def test_fused_weights_edited_in_place_or_moved_are_not_served_stale():
    from fcn_zoo._fusion import ConvAct

    model = tiny_fcn()
    fused = copy.deepcopy(model).fuse()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused(x)  # packs the weights for oneDNN
        for m in fused.modules():
            if isinstance(m, ConvAct):
                m.weight.mul_(0.5)
        packed = fused(x)
        reference = fused(x.clone().requires_grad_(True))  # the unpacked conv2d path on the edited weights
    assert (packed - reference).abs().max() <= 1e-5 * reference.abs().max() + 1e-6

    fused = copy.deepcopy(model).fuse()
    with torch.no_grad():
        fused(x)
        expected = model.double()(x.double())
        assert (fused.double()(x.double()) - expected).abs().max() <= 1e-6 * expected.abs().max()  # folded in float32
        again = fused.float()(x)  # back to float32: packed afresh from the new tensors
        assert (again - expected.float()).abs().max() <= 1e-5 * expected.abs().max()
        assert torch.equal(copy.deepcopy(fused)(x), again)  # a copy after use runs too


def test_a_convolution_with_weights_beyond_the_caches_runs_split_with_the_same_result():
    from fcn_zoo._fusion import ConvAct, input_splits

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2048, 512, 3, padding=2, dilation=2)  # FCN's head, 38 MB of weights
    assert input_splits(conv.weight) == 4
    layer = ConvAct(conv, relu=True)
    x = torch.randn(2, 2048, 9, 13)
    with torch.no_grad():
        expected = torch.relu(conv(x))
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            assert (layer(inp) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert len(layer._packed[torch.float32][1][0]) == 4  # the split path ran
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 1024, 9, 13))  # a wrong channel count is refused, not sliced


def test_a_model_made_and_fused_under_inference_mode_runs_and_exports(tmp_path):
    from fcn_zoo._fusion import ConvAct
    from fcn_zoo.export import onnx_session

    expected_model = tiny_fcn()
    with torch.inference_mode():
        model = tiny_fcn().fuse()  # every tensor an inference tensor: no version counters, no views
        head = ConvAct(torch.nn.Conv2d(2048, 512, 3, padding=1), relu=True)  # split into slices
        y = torch.randn(1, 2048, 6, 6)
        assert (head(y) - torch.relu(torch.nn.functional.conv2d(y, head.weight, head.bias, padding=1))).abs().max() < 1e-4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = expected_model(x)
        assert (model(x) - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6
    session = onnx_session(model)  # reads the weights' edit counters
    logits = session.run(None, {"image": x.numpy()})[0]
    assert logits.shape[1] == 21


def test_fused_model_under_cpu_bf16_autocast_runs_bf16_kernels_and_keeps_fp32_ones_apart(caplog):
    from fcn_zoo._fusion import ConvAct, onednn_available

    model = _bottleneck_fcn()
    fused = copy.deepcopy(model).fuse()
    x = torch.randn(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        fp32 = fused(x)
        head = fused.decode_head[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = fused(x)
        assert isinstance(head, ConvAct)
        if onednn_available(torch.bfloat16):
            assert head._packed[torch.bfloat16][1][0][0].dtype == torch.bfloat16
        else:  # a CPU without bf16 instructions: autocast's plain bf16 convolutions, nothing packed in bf16
            assert torch.bfloat16 not in head._packed
        again = fused(x)  # fp32 after bf16: its own packed weights, not the bf16 ones, both kept
    assert head._packed[torch.float32][1][0][0].dtype == torch.float32
    assert len(head._packed) == (2 if onednn_available(torch.bfloat16) else 1)
    assert half.dtype == torch.bfloat16  # as autocast's own convolutions would give
    assert torch.equal(fp32, again)
    err = (half.float() - expected).abs().max()
    assert 0 < err <= 0.05 * expected.abs().max()  # bf16 rounding: not fp32, not garbage
    assert (half.float().argmax(1) == expected.argmax(1)).float().mean() > 0.98
    assert "replaced" not in caplog.text and "fail" not in caplog.text  # no kernel had to be given up


def test_if_the_fused_kernels_fail_on_a_machine_the_plain_path_answers_once_warned(monkeypatch, caplog):
    from fcn_zoo import _fusion

    model = tiny_fcn()
    fused = copy.deepcopy(model).fuse()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(_fusion.ConvAct, "_onednn_forward", lambda self, *a: broken())
    monkeypatch.setattr(_fusion, "_refused", set())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), caplog.at_level("WARNING", logger="fcn_zoo._fusion"):
        expected = model(x)
        got = fused(x)
        fused(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6
    assert len(calls) == 1  # tried once, then the plain path for every layer and call
    assert sum("oneDNN fused convolution failed" in r.getMessage() for r in caplog.records) == 1


# --- fast by default ---------------------------------------------------------------------------------


def _plain(model: fcn_zoo.FCN, x: torch.Tensor) -> torch.Tensor:
    """The plain module's logits: with autograd on, the fast path never runs."""
    with torch.enable_grad():
        return model(x).detach()


def test_cpu_inference_runs_the_fused_twin_by_default_and_equals_the_plain_module():
    model = _bottleneck_fcn()
    x = torch.randn(1, 3, 64, 80)
    expected = _plain(model, x)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            got = model(x)
            features = model.forward_features(x)
        twin = model.__dict__["_fast"][1]
        assert twin._fused and twin.auxiliary_head is None
        assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
        with torch.enable_grad():
            assert torch.allclose(features, model.decode_head(model.backbone(x)[-1]).detach(), atol=1e-4)
    assert "_fast" not in "".join(model.state_dict())  # not part of the module
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched


def test_the_twin_never_answers_with_stale_weights():
    model, other = _bottleneck_fcn(), fcn_zoo.FCN(num_classes=5, backbone="resnet50c", output_stride=8, head_channels=16, aux_channels=8).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        model(x)  # builds the twin
    model.load_state_dict(other.state_dict())  # new weights after a fast call
    with torch.inference_mode():
        assert torch.allclose(model(x), _plain(other, x), atol=1e-4)
    with torch.no_grad():
        model.decode_head.classifier.bias.add_(1.0)  # an in-place edit
        assert torch.allclose(model(x), _plain(other, x) + 1.0, atol=1e-4)
    model.double()  # .to(): another dtype, another twin
    with torch.inference_mode():
        assert model(x.double()).dtype == torch.float64


def test_training_hooks_deepcopy_and_pickling_see_the_plain_module(tmp_path):
    import pickle

    model = _bottleneck_fcn()
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        model(x)
    assert "_fast" not in copy.deepcopy(model).__dict__  # no copy of the twin
    restored = pickle.loads(pickle.dumps(model))
    assert "_fast" not in restored.__dict__ and torch.equal(_plain(restored, x), _plain(model, x))
    model.save_pretrained(tmp_path / "saved")  # not refused as a fused model would be
    seen = []
    handle = model.backbone.layer4.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode():
        model(x)
    handle.remove()
    assert seen == [(1, 2048, 8, 10)]  # the user's hook on an inner layer fired
    model.train()
    assert "_fast" not in model.__dict__
    logits, aux = model(x)
    assert logits.shape == aux.shape == (1, 5, 64, 80)
