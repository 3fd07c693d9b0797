"""ImageNet initialisation of a recipe's backbone: the reference's openmmlab V1c files (the default), timm's
V1c weights, any file, or none.

The openmmlab files are downloaded once into the fcn_zoo cache (``$FCN_ZOO_CACHE/backbones``) and checked
against the sha256 prefix their names carry (``resnet50_v1c-2cccc1ad.pth``: the sha256 starts with
``2cccc1ad``, openmmlab's convention); ``$FCN_ZOO_OPENMMLAB_URL`` replaces the download folder (a mirror).
"""

from __future__ import annotations

import os
from pathlib import Path

import fcn_zoo

OPENMMLAB_URL = "https://download.openmmlab.com/pretrain/third_party"
# the files the reference's configs name for its ResNet-50/101 V1c backbones
OPENMMLAB_FILES = {"resnet50c": "resnet50_v1c-2cccc1ad.pth", "resnet101c": "resnet101_v1c-e67eebb6.pth"}


def initialise_backbone(model: fcn_zoo.FCN, backbone: str, output_stride: int, weights: str) -> None:
    """``weights``: ``openmmlab``, ``timm``, ``none`` or a file (timm's safetensors/.pth or openmmlab's layout)."""
    if weights == "none":
        return
    if weights == "openmmlab":
        load_backbone_file(model, openmmlab_file(backbone))
        return
    if weights == "timm":
        import timm

        # resnet50c / resnet101c: timm's V1c ImageNet weights (gluon_in1k), downloaded from the Hub once
        pretrained = timm.create_model(backbone, pretrained=True, features_only=True, out_indices=(3, 4), output_stride=output_stride)
        model.backbone.load_state_dict(pretrained.state_dict())
        return
    load_backbone_file(model, Path(weights))


def openmmlab_file(backbone: str) -> Path:
    """The cached openmmlab V1c file of ``backbone``, downloaded and checked if it is not cached yet."""
    from fcn_zoo._files import cache_lock, cache_root

    if backbone not in OPENMMLAB_FILES:
        raise SystemExit(
            f"--backbone-weights openmmlab: openmmlab publishes V1c weights for {', '.join(OPENMMLAB_FILES)} only, "
            f"not {backbone}; use --backbone-weights timm, none or a file"
        )
    name = OPENMMLAB_FILES[backbone]
    path = cache_root() / "backbones" / name
    if path.is_file():  # no lock to read what is there (a read-only cache too)
        return _openmmlab_file(name, path)
    with cache_lock(f"backbone-{name}"):  # torchrun's processes: one downloads, the others wait and find it
        return _openmmlab_file(name, path)


def _openmmlab_file(name: str, path: Path) -> Path:
    from fcn_zoo._files import atomic_path, sha256_file
    from fcn_zoo.downloads import download
    from fcn_zoo.errors import first_line, is_connection_error

    prefix = name.rsplit("-", 1)[1].split(".")[0]
    if path.is_file():
        sha256 = sha256_file(path)  # a cached file is checked at each use too: it may have been replaced by hand
        if sha256.startswith(prefix):
            return path
        raise SystemExit(f"--backbone-weights openmmlab: {path} has sha256 {sha256}, its name says {prefix}...; "
                         "delete it to download it again")
    url = f"{os.environ.get('FCN_ZOO_OPENMMLAB_URL', OPENMMLAB_URL).rstrip('/')}/{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # checked before it takes the cache's name
        try:
            sha256 = download(url, tmp)
        except Exception as e:
            if not (is_connection_error(e) or isinstance(e, OSError)):
                raise
            raise SystemExit(f"--backbone-weights openmmlab: {url} could not be downloaded ({first_line(e)}); "
                             f"put the file at {path}, or use --backbone-weights timm") from e
        if not sha256.startswith(prefix):
            raise SystemExit(f"--backbone-weights openmmlab: {url} has sha256 {sha256}, its name says {prefix}...; it was not kept")
    return path


def load_backbone_file(model: fcn_zoo.FCN, path: Path) -> None:
    """ImageNet weights from a file: timm's (safetensors or .pth) or openmmlab's V1c (``stem.*`` keys)."""
    from fcn_zoo.convert import read_checkpoint

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = read_checkpoint(path)
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("backbone.")
        if key.startswith(("fc.", "head.")):
            continue  # the ImageNet classifier
        key = key.replace("stem.7.", "bn1.", 1) if key.startswith("stem.7.") else key.replace("stem.", "conv1.", 1) if key.startswith("stem.") else key
        renamed[key] = value
    try:
        missing, unexpected = model.backbone.load_state_dict(renamed, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        raise SystemExit(f"{path}: does not fit the backbone: {str(e).splitlines()[1].strip()}") from e
    if missing or unexpected:
        raise SystemExit(f"{path}: does not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")

