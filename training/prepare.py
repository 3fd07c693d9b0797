"""Turn downloaded datasets into the layouts training reads.

    fcn-zoo prepare sbd --sbd /data/benchmark_RELEASE --data-root /data       # python -m training.prepare in a checkout

``sbd``: the Semantic Boundaries Dataset's ``dataset/cls/<id>.mat`` labels become palette PNGs in
``VOCdevkit/VOC2012/SegmentationClass`` (VOC's own labels are kept where both exist), and
``ImageSets/Segmentation/trainaug.txt`` lists SBD train + val and VOC train, minus VOC val: the 10,582
images of the reference's ``trainaug``. ADE20K and Cityscapes are read as downloaded (Cityscapes' label ids
are mapped to train ids while loading).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fcn_zoo._files import atomic_path
from fcn_zoo.zoo import DATASETS

from .data import DatasetLayoutError


def prepare_sbd(sbd: Path, data_root: Path) -> int:
    """Convert SBD's labels; returns the number of images in trainaug."""
    from scipy.io import loadmat

    voc = data_root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    for needed in (sbd / "dataset" / "cls", sbd / "dataset" / "train.txt", sets / "train.txt", sets / "val.txt"):
        if not needed.exists():
            raise DatasetLayoutError(
                f"{needed}: missing; expected SBD's benchmark_RELEASE/dataset/{{cls,train.txt,val.txt}} and "
                "VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt"
            )
    read = lambda p: [line.strip() for line in p.read_text().splitlines() if line.strip()]  # noqa: E731
    sbd_ids = read(sbd / "dataset" / "train.txt") + (read(sbd / "dataset" / "val.txt") if (sbd / "dataset" / "val.txt").exists() else [])
    voc_val = set(read(sets / "val.txt"))
    trainaug = sorted((set(sbd_ids) | set(read(sets / "train.txt"))) - voc_val)
    palette = [c for rgb in DATASETS["voc"].palette for c in rgb]
    labels = voc / "SegmentationClass"
    labels.mkdir(parents=True, exist_ok=True)
    for image_id in sbd_ids:
        target = labels / f"{image_id}.png"
        if target.exists() or image_id in voc_val:
            continue
        source = sbd / "dataset" / "cls" / f"{image_id}.mat"
        try:
            segmentation = np.asarray(loadmat(source, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation, dtype=np.uint8)
        except (OSError, KeyError, AttributeError, ValueError) as e:
            raise DatasetLayoutError(f"{source}: not an SBD label file with GTcls.Segmentation ({e})") from e
        img = Image.fromarray(segmentation, mode="P")
        img.putpalette(palette)
        with atomic_path(target) as tmp:
            img.save(tmp, format="PNG")
    missing = [i for i in trainaug if not (labels / f"{i}.png").exists()]
    if missing:
        raise DatasetLayoutError(f"{labels / (missing[0] + '.png')}: no label from VOC or SBD for {len(missing)} trainaug images")
    with atomic_path(sets / "trainaug.txt") as tmp:
        tmp.write_text("\n".join(trainaug) + "\n")
    return len(trainaug)


def main(argv: list[str] | None = None, prog: str = "python -m training.prepare") -> int:
    """The command line (``fcn-zoo prepare``, or ``python -m training.prepare`` in a checkout)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sbd", help="SBD labels -> VOC SegmentationClass PNGs + trainaug.txt")
    p.add_argument("--sbd", required=True, type=Path, help="the extracted benchmark_RELEASE folder")
    p.add_argument("--data-root", required=True, type=Path, help="the folder holding VOCdevkit")
    args = parser.parse_args(argv)
    count = prepare_sbd(args.sbd, args.data_root)
    print(f"trainaug: {count} images listed in {args.data_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
