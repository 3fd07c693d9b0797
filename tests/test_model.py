"""The FCN module itself: outputs, heads, fusion for inference."""

from __future__ import annotations

import copy
import re

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
    logits, aux = model(torch.randn(1, 3, 64, 64))  # train mode: the same pair whatever the architecture
    assert logits.shape == (1, 4, 64, 64) and aux is None


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_classes"):
        fcn_zoo.FCN(num_classes=0)
    with pytest.raises(ValueError, match="output_stride"):
        fcn_zoo.FCN(output_stride=12)
    with pytest.raises(ValueError, match="backbone"):
        fcn_zoo.FCN(backbone="resnet_does_not_exist")
    with pytest.raises(ValueError, match="dataset"):
        fcn_zoo.FCN(dataset="coco")
    with pytest.raises(ValueError, match="num_convs"):
        fcn_zoo.FCN(num_convs=0, concat_input=True)


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


def _path_layers(fused: fcn_zoo.FCN) -> list:
    """The fused convolutions an eval forward runs (not the training-only auxiliary head's)."""
    from fcn_zoo._fusion import ConvAct

    return [m for name, m in fused.named_modules() if isinstance(m, ConvAct) and not name.startswith("auxiliary_head")]


def _bottleneck_fcn(seed: int = 0) -> fcn_zoo.FCN:
    from conftest import randomize_batchnorm

    torch.manual_seed(seed)
    model = fcn_zoo.FCN(num_classes=5, backbone="resnet50c", output_stride=8, head_channels=16, aux_channels=8)
    return randomize_batchnorm(model, seed).eval()


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


def test_if_the_fused_kernels_fail_each_layer_warns_once_and_answers_through_its_plain_path(monkeypatch, caplog):
    from fcn_zoo import _fusion

    model = tiny_fcn()
    fused = copy.deepcopy(model).fuse()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(_fusion.ConvAct, "_onednn_forward", lambda self, *a: broken())
    monkeypatch.setattr(_fusion, "_warned", set())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), caplog.at_level("WARNING", logger="fcn_zoo._fusion"):
        expected = model(x)
        got = fused(x)
        fused(x)
    layers = _path_layers(fused)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6
    assert len(calls) == len(layers)  # each layer tried once, then its plain path for every later call
    assert sum("oneDNN fused convolution failed" in r.getMessage() for r in caplog.records) == 1  # one line
    monkeypatch.undo()
    other = copy.deepcopy(model).fuse()  # another model is not affected by this one's failures
    with torch.no_grad():
        other(x)
    assert all(m._packed and not m._failed for m in _path_layers(other))


# --- one answer in every state: the module is plain, the fast path explicit ------------------------------


def _fresh(model: fcn_zoo.FCN, x: torch.Tensor) -> torch.Tensor:
    """What the module's layers compute, from a copy that has never run (nothing cached), with autograd on."""
    with torch.enable_grad():
        return copy.deepcopy(model)(x).detach()


def _data_write(model):
    model.decode_head.classifier.bias.data.add_(5.0)


def _numpy_write(model):
    model.decode_head[0].weight.detach().numpy()[:] *= 0.5


def _load_under_inference_mode(model):
    with torch.inference_mode():  # inference tensors carry no version counter
        model.load_state_dict(_bottleneck_fcn(seed=1).state_dict())


def _swap_layer(model):
    model.decode_head[2] = torch.nn.GELU()


def _batchnorm_eps(model):
    model.decode_head[1].eps = 0.5


def _conv_geometry(model):
    conv = model.decode_head[3]
    conv.padding, conv.dilation = (2, 2), (2, 2)


STATE_CHANGES = [_data_write, _numpy_write, _load_under_inference_mode, _swap_layer, _batchnorm_eps, _conv_geometry]


@pytest.mark.parametrize("change", STATE_CHANGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_the_default_call_answers_for_the_model_as_it_is_now(change, context):
    model = _bottleneck_fcn()
    x = torch.randn(1, 3, 64, 80)
    with context():
        before = model(x)
        model.forward_features(x)
    change(model)
    expected = _fresh(model, x)
    with context():
        got = model(x)
        features = model.forward_features(x)
    assert (expected - before).abs().max() > 1e-3  # the change changes the answer
    assert torch.equal(got, expected)  # exactly the module's own computation, no rounding of another path
    with torch.enable_grad():
        assert torch.equal(features, model.decode_head(model.backbone(x)[-1]).detach())


def test_submodules_in_training_mode_train_under_no_grad():
    model = _bottleneck_fcn()
    x = torch.randn(1, 3, 64, 80)
    dropout = model.decode_head[-2]
    dropout.p = 0.5
    dropout.train()  # Monte Carlo dropout on an eval model
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        b = model(x)
        torch.manual_seed(0)
        again = model(x)
    assert not torch.equal(a, b) and torch.equal(a, again)  # a draw per call, from torch's RNG
    torch.manual_seed(0)
    assert torch.equal(a, _fresh(model, x))

    batchnorm = model.decode_head[1]
    batchnorm.train()  # recalibrating statistics under no_grad
    mean = batchnorm.running_mean.clone()
    with torch.inference_mode():
        model(x)
    assert not torch.equal(batchnorm.running_mean, mean)


def test_a_model_called_with_a_tensor_on_another_device_gets_torchs_error_and_no_other_model_suffers(caplog):
    elsewhere = _bottleneck_fcn().to("meta")  # the one other device a CPU-only machine has
    fused_elsewhere = _bottleneck_fcn().fuse().to("meta")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad(), caplog.at_level("WARNING", logger="fcn_zoo._fusion"):
        with pytest.raises(RuntimeError, match="device"):
            elsewhere(x)  # torch's own error
        fused_elsewhere(x)  # conv2d's answer for such weights, whatever it is: oneDNN is not tried
        assert "oneDNN" not in caplog.text
        fused = _bottleneck_fcn().fuse()
        expected = _fresh(_bottleneck_fcn(), x)
        got = fused(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert all(m._packed and not m._failed for m in _path_layers(fused))  # oneDNN's kernels ran for the next model
    assert not any(m._failed for m in _path_layers(fused_elsewhere))


def test_threads_calling_one_model_at_once_get_one_answer():
    from concurrent.futures import ThreadPoolExecutor

    model = _bottleneck_fcn()
    x = torch.randn(1, 3, 64, 80)
    expected = _fresh(model, x)
    sizes = sum(t.numel() for t in model.state_dict().values())

    def call(_):
        with torch.inference_mode():
            return model(x)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(call, range(4)))
    assert all(torch.equal(a, expected) for a in answers)
    assert set(model.__dict__) == set(_bottleneck_fcn().__dict__)  # nothing kept on the model, as one never run
    assert sum(t.numel() for t in model.state_dict().values()) == sizes


def test_fuse_in_place_or_as_a_copy():
    model = _bottleneck_fcn()
    model.train()
    x = torch.randn(1, 3, 64, 80)
    copied = model.fuse(inplace=False)
    assert copied._fused and copied.auxiliary_head is None
    assert not any(m.training for m in copied.modules())  # the fused layers too: predict never switches it
    assert model.training and not getattr(model, "_fused", False) and model.auxiliary_head is not None
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert (copied(x) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert model.fuse() is model and model._fused and model.fuse() is model  # in place, once
    with pytest.raises(ValueError, match="inplace=False"):
        model.fuse(device="cpu")


def test_a_gpu_model_is_channels_last_once_fused_and_a_cpu_model_is_not(monkeypatch):
    """fcn-zoo predict and the engine's copies run fused models: on a GPU in the layout tensor cores run fastest."""
    import fcn_zoo._inference as inference

    model = tiny_fcn(3)
    convs = lambda m: [c.weight for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert all(w.is_contiguous() for w in convs(model.fuse(inplace=False)))  # the CPU's fused model: as it was
    monkeypatch.setattr(inference, "device_of", lambda m: torch.device("cuda"))  # the model as one on a GPU
    fused = model.fuse(inplace=False)
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs(fused) if w.shape[-1] > 1)
    assert all(w.is_contiguous() for w in convs(model))  # the model itself is left as it was


def test_a_channels_last_model_saves_and_loads_and_keeps_its_layout(tmp_path, monkeypatch):
    """A GPU training run holds its model channels_last when best/ is written."""
    import safetensors.torch

    # saving must not rest on save_model making tensors contiguous: before safetensors 0.4.4 it did not
    strict = safetensors.torch.save_model
    monkeypatch.setattr(safetensors.torch, "save_model", lambda model, filename, metadata=None, force_contiguous=False:
                        strict(model, filename, metadata, force_contiguous=False))
    model = tiny_fcn(3).to(memory_format=torch.channels_last)
    model.save_pretrained(tmp_path / "m")
    loaded = fcn_zoo.from_pretrained(tmp_path / "m")
    assert model.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    weight = model.backbone.conv1[0].weight if isinstance(model.backbone.conv1, torch.nn.Sequential) else model.backbone.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_training_hooks_deepcopy_and_pickling_see_the_plain_module(tmp_path):
    import pickle

    model = _bottleneck_fcn()
    x = torch.randn(1, 3, 64, 80)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(_fresh(restored, x), _fresh(model, x))
    model.save_pretrained(tmp_path / "saved")
    seen = []
    handle = model.backbone.layer4.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode():
        model(x)
    handle.remove()
    assert seen == [(1, 2048, 8, 10)]  # the user's hook on an inner layer fired
    model.train()
    logits, aux = model(x)
    assert logits.shape == aux.shape == (1, 5, 64, 80)


@pytest.mark.parametrize("key,value,said", [
    ("backbone", None, "unknown timm backbone None"),
    ("num_classes", 10**9, "num_classes must be an integer from 1 to 65536"),
    ("head_channels", "16", "head_channels must be a positive integer"),
    ("aux_channels", "x", "aux_channels must be a positive integer or None"),
    ("dropout", "x", "dropout must be a number in [0, 1)"),
])
def test_a_config_value_of_the_wrong_kind_is_named(tmp_path, key, value, said):
    import json

    folder = tmp_path / "m"
    fcn_zoo.FCN(num_classes=3, backbone="resnet18", head_channels=16, aux_channels=None).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(fcn_zoo.WeightsError, match=re.escape(said)):
        fcn_zoo.from_pretrained(folder)
