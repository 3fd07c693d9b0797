"""torch.hub entry points: one per checkpoint of the zoo, and ``from_pretrained`` for any other FCN.

    model = torch.hub.load("<owner>/fcn-zoo", "fcn_resnet50os8_voc")
    model = torch.hub.load("path/to/fcn-zoo", "fcn_resnet50os8_voc", source="local")
    model = torch.hub.load("<owner>/fcn-zoo", "from_pretrained", "me/my-fcn")   # a Hub repo, folder or .pth
"""

import fcn_zoo as _fcn_zoo
from fcn_zoo.hub import model_device as _model_device

# every runtime dependency of pyproject.toml, by import name: torch.hub checks each before loading
dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors", "PIL", "numpy", "jinja2", "tqdm", "filelock"]


def _entry_point(name):
    checkpoint = _fcn_zoo.CHECKPOINTS[name]

    def load(pretrained=True, num_classes=None, **kwargs):
        if pretrained:
            return _fcn_zoo.from_pretrained(name, num_classes=num_classes, **kwargs)
        config = checkpoint.model_config()
        if num_classes is not None and num_classes != config["num_classes"]:
            config.update(num_classes=num_classes, dataset=None)
        device = _model_device(kwargs.pop("device", None))  # checked as the pretrained path checks it
        for loading_only in ("revision", "cache_dir", "local_files_only"):  # nothing is loaded
            kwargs.pop(loading_only, None)
        config.update(kwargs)  # FCN's keywords replace the row's (output_stride=8, dataset=None)
        return _fcn_zoo.FCN(**config).to(device)  # random weights, in training mode as torchvision's builders give

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (
        f"{checkpoint.title}: {checkpoint.num_classes} classes, reference mIoU {checkpoint.reference_miou:.2f} on "
        f"{checkpoint.data.title} {checkpoint.data.val_split}.\n\n"
        "Args:\n"
        "    pretrained: load the published weights (default); False gives random weights.\n"
        "    num_classes: a different number of classes freshly initialises the classifiers (fine-tuning).\n"
        "    **kwargs: passed to fcn_zoo.from_pretrained (revision, device, cache_dir, local_files_only)\n"
        "        or, without weights, device and the others to fcn_zoo.FCN (the model in training mode).\n"
    )
    return load


globals().update({_name: _entry_point(_name) for _name in _fcn_zoo.CHECKPOINTS})


def from_pretrained(name_or_path, **kwargs):
    """Any FCN fcn_zoo loads: a zoo name, a Hub repo id (``owner/name[@revision]``), a ``save_pretrained``
    folder or a reference ``.pth``; ``**kwargs`` as ``fcn_zoo.from_pretrained`` (revision, num_classes,
    device, cache_dir, local_files_only)."""
    return _fcn_zoo.from_pretrained(name_or_path, **kwargs)
