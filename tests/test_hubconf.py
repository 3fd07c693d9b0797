"""torch.hub: the twelve entry points of hubconf.py and from_pretrained, loaded from a local checkout."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import torch

import fcn_zoo
from fcn_zoo import hub

REPO = Path(__file__).resolve().parents[1]


def _entrypoints() -> list[str]:
    # what torch.hub.list does once it has the repository
    module = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))
    return sorted(f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_")), module


def test_hubconf_lists_exactly_the_twelve_models_with_documented_signatures():
    names, module = _entrypoints()
    assert names == sorted([*fcn_zoo.list_models(), "from_pretrained"])
    for name in fcn_zoo.list_models():
        fn = getattr(module, name)
        params = inspect.signature(fn).parameters
        assert params["pretrained"].default is True and params["num_classes"].default is None
        row = fcn_zoo.CHECKPOINTS[name]
        assert f"{row.reference_miou:.2f}" in fn.__doc__ and row.data.title in fn.__doc__ and str(row.num_classes) in fn.__doc__
    for dependency in module.dependencies:
        __import__(dependency)
    # every runtime dependency the package declares is one torch.hub checks
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    import_names = {"pillow": "PIL", "huggingface-hub": "huggingface_hub"}
    names = {import_names.get(n, n) for n in (re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in declared)}
    assert names == set(module.dependencies)


@pytest.mark.parametrize("name", fcn_zoo.list_models())
def test_torch_hub_load_local_builds_each_architecture(name):
    model = torch.hub.load(str(REPO), name, source="local", pretrained=False)
    row = fcn_zoo.CHECKPOINTS[name]
    assert isinstance(model, fcn_zoo.FCN)
    assert model.num_classes == row.num_classes and model.output_stride == row.output_stride
    assert len(model.backbone.layer3) == (23 if row.depth == 101 else 6)
    assert model.decode_head.classifier.out_channels == row.num_classes


def test_torch_hub_load_local_with_cached_weights(tiny_folder):
    shutil.copytree(tiny_folder, hub.cache_root() / "reference" / "fcn_resnet50os8_voc")
    model = torch.hub.load(str(REPO), "fcn_resnet50os8_voc", source="local", local_files_only=True)
    assert not model.training
    reference = fcn_zoo.from_pretrained(tiny_folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    model = torch.hub.load(str(REPO), "fcn_resnet50os8_voc", source="local", num_classes=3, local_files_only=True)
    assert model.num_classes == 3


def test_torch_hub_from_pretrained_loads_any_fcn_folder(tiny_folder):
    model = torch.hub.load(str(REPO), "from_pretrained", str(tiny_folder), source="local")
    reference = fcn_zoo.from_pretrained(tiny_folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_an_entry_point_without_weights_takes_the_loading_keywords():
    model = torch.hub.load(str(REPO), "fcn_resnet50os16_voc", source="local", pretrained=False, device="cpu",
                           local_files_only=True, num_classes=5)
    assert isinstance(model, fcn_zoo.FCN) and model.num_classes == 5 and model.training


def test_without_weights_the_rows_config_gives_way_to_the_callers_keywords_and_the_device_is_checked():
    model = torch.hub.load(str(REPO), "fcn_resnet50os16_voc", source="local", pretrained=False, output_stride=8,
                           dataset=None, num_convs=1)
    assert (model.output_stride, model.dataset, model.decode_head.num_convs) == (8, None, 1)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):  # as with pretrained=True, before building anything
        torch.hub.load(str(REPO), "fcn_resnet50os16_voc", source="local", pretrained=False, device="gpu")
