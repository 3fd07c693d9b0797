"""The twelve published FCN checkpoints and the datasets they were trained on, as data.

Everything about a checkpoint -- architecture, dataset, recipe, reference mIoU and where its weights
live -- is one :class:`Checkpoint` row in :data:`CHECKPOINTS`. Adding a checkpoint is adding a row.
This module imports nothing heavy so that ``fcn-zoo list`` and ``import fcn_zoo`` stay fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UnknownModelError

__all__ = [
    "Checkpoint", "DatasetInfo", "CHECKPOINTS", "DATASETS", "get_checkpoint", "checkpoint_for_file",
    "eval_resize_shape", "folder_metadata",
]

#: Where the reference implementation (sssegmentation) publishes its FCN weights.
REFERENCE_BASE_URL = "https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_fcn"
#: The reference's release page named its files ``<name>_train.pth`` until late 2023 and ``<name>.pth`` since.
REFERENCE_FILE_SUFFIXES = ("", "_train")
#: The Hugging Face Hub organisation that hosts the converted checkpoints.
HUB_ORGANISATION = "fcn-zoo"

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on 0..255 pixel values
IMAGENET_STD = (58.395, 57.12, 57.375)

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor',
)

VOC_PALETTE = (
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128),
    (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0),
    (128, 192, 0), (0, 64, 128),
)

ADE20K_CLASSES = (
    'wall', 'building, edifice', 'sky', 'floor, flooring', 'tree', 'ceiling', 'road, route', 'bed',
    'windowpane, window', 'grass', 'cabinet', 'sidewalk, pavement',
    'person, individual, someone, somebody, mortal, soul', 'earth, ground', 'door, double door',
    'table', 'mountain, mount', 'plant, flora, plant life', 'curtain, drape, drapery, mantle, pall',
    'chair', 'car, auto, automobile, machine, motorcar', 'water', 'painting, picture',
    'sofa, couch, lounge', 'shelf', 'house', 'sea', 'mirror', 'rug, carpet, carpeting', 'field',
    'armchair', 'seat', 'fence, fencing', 'desk', 'rock, stone', 'wardrobe, closet, press', 'lamp',
    'bathtub, bathing tub, bath, tub', 'railing, rail', 'cushion', 'base, pedestal, stand', 'box',
    'column, pillar', 'signboard, sign', 'chest of drawers, chest, bureau, dresser', 'counter',
    'sand', 'sink', 'skyscraper', 'fireplace, hearth, open fireplace', 'refrigerator, icebox',
    'grandstand, covered stand', 'path', 'stairs, steps', 'runway',
    'case, display case, showcase, vitrine', 'pool table, billiard table, snooker table', 'pillow',
    'screen door, screen', 'stairway, staircase', 'river', 'bridge, span', 'bookcase',
    'blind, screen', 'coffee table, cocktail table',
    'toilet, can, commode, crapper, pot, potty, stool, throne', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove, kitchen stove, range, kitchen range, cooking stove', 'palm, palm tree',
    'kitchen island',
    'computer, computing machine, computing device, data processor, electronic computer, information processing system',
    'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel, hut, hutch, shack, shanty',
    'bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle',
    'towel', 'light, light source', 'truck, motortruck', 'tower', 'chandelier, pendant, pendent',
    'awning, sunshade, sunblind', 'streetlight, street lamp', 'booth, cubicle, stall, kiosk',
    'television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, goggle box',
    'airplane, aeroplane, plane', 'dirt track', 'apparel, wearing apparel, dress, clothes', 'pole',
    'land, ground, soil', 'bannister, banister, balustrade, balusters, handrail',
    'escalator, moving staircase, moving stairway', 'ottoman, pouf, pouffe, puff, hassock',
    'bottle', 'buffet, counter, sideboard', 'poster, posting, placard, notice, bill, card', 'stage',
    'van', 'ship', 'fountain', 'conveyer belt, conveyor belt, conveyer, conveyor, transporter',
    'canopy', 'washer, automatic washer, washing machine', 'plaything, toy',
    'swimming pool, swimming bath, natatorium', 'stool', 'barrel, cask', 'basket, handbasket',
    'waterfall, falls', 'tent, collapsible shelter', 'bag', 'minibike, motorbike', 'cradle', 'oven',
    'ball', 'food, solid food', 'step, stair', 'tank, storage tank',
    'trade name, brand name, brand, marque', 'microwave, microwave oven', 'pot, flowerpot',
    'animal, animate being, beast, brute, creature, fauna', 'bicycle, bike, wheel, cycle', 'lake',
    'dishwasher, dish washer, dishwashing machine', 'screen, silver screen, projection screen',
    'blanket, cover', 'sculpture', 'hood, exhaust hood', 'sconce', 'vase',
    'traffic light, traffic signal, stoplight', 'tray',
    'ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin',
    'fan', 'pier, wharf, wharfage, dock', 'crt screen', 'plate', 'monitor, monitoring device',
    'bulletin board, notice board', 'shower', 'radiator', 'glass, drinking glass', 'clock', 'flag',
)

ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic_light', 'traffic_sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle',
    'bicycle',
)

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the dataset it was trained on.

    ``eval_size`` is the reference evaluation resize: the image is scaled, keeping its aspect ratio,
    by ``min(max(eval_size) / long_side, min(eval_size) / short_side)``. ``typical_image`` is the
    ``(height, width)`` of a typical val image, at whose evaluation size the table's GFLOPs are counted.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    eval_size: tuple[int, int]
    crop_size: tuple[int, int]
    train_split: str
    val_split: str
    hub_dataset: str
    typical_image: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def typical_eval_shape(self) -> tuple[int, int]:
        """``(height, width)`` at which a typical val image is evaluated."""
        return eval_resize_shape(*self.typical_image, self.eval_size)

    def metadata(self) -> dict:
        """What a model folder's ``config.json`` records about this dataset, so that it needs no table to be read."""
        return folder_metadata(self.classes, self.palette, self.mean, self.std, self.eval_size, self.crop_size)


def folder_metadata(class_names, palette, mean, std, eval_size, crop_size) -> dict:
    """The keys of ``config.json`` beside the architecture that describe how a model is read and used, as
    JSON values: the same for a dataset of the table and for any model's own."""
    return {
        "class_names": list(class_names),
        "palette": [list(c) for c in palette],
        "mean": list(mean),
        "std": list(std),
        "eval_size": list(eval_size),
        "crop_size": list(crop_size),
    }


def eval_resize_shape(height: int, width: int, eval_size) -> tuple[int, int]:
    """The reference's keep-ratio resize: the ``(h, w)`` an image of ``height x width`` is evaluated at."""
    scale = min(max(eval_size) / max(height, width), min(eval_size) / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))  # a thin strip keeps a pixel


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            name="voc", title="PASCAL VOC 2012", classes=VOC_CLASSES, palette=VOC_PALETTE,
            eval_size=(2048, 512), crop_size=(512, 512), train_split="trainaug", val_split="val",
            hub_dataset="pascal_voc", typical_image=(375, 500),
        ),
        DatasetInfo(
            name="ade20k", title="ADE20K", classes=ADE20K_CLASSES, palette=ADE20K_PALETTE,
            eval_size=(2048, 512), crop_size=(512, 512), train_split="train", val_split="val",
            hub_dataset="scene_parse_150", typical_image=(512, 683),
        ),
        DatasetInfo(
            name="cityscapes", title="Cityscapes", classes=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE,
            eval_size=(2048, 1024), crop_size=(512, 1024), train_split="train", val_split="val",
            hub_dataset="cityscapes", typical_image=(1024, 2048),
        ),
    )
}


@dataclass(frozen=True)
class Checkpoint:
    """One published FCN checkpoint: one row of the model zoo table."""

    name: str
    backbone: str  # a timm model name
    output_stride: int
    dataset: str  # a key of DATASETS
    batch_size: int
    epochs: int
    miou: float  # reference mIoU (%) on the dataset's val split, single scale, as in the seed table
    params_m: float  # parameters of the inference network (without the training-only auxiliary head), millions
    gflops: float  # one forward pass at the evaluation size of a typical image (multiply-adds count two)
    weights_mb: float  # model.safetensors, fp32, auxiliary head included, MB (10^6 bytes)
    miou_newest: float | None = None  # the reference's newest published mIoU, where it differs from ``miou``
    lr: float = 0.01
    hub_repo_id: str = ""  # defaults to fcn-zoo/<name>
    hub_revision: str = ""  # the pinned 40-hex commit of hub_repo_id; empty until published
    reference_url: str = ""  # the reference's published .pth; defaults to <REFERENCE_BASE_URL>/<name>.pth
    sha256: str = ""  # of the reference .pth; empty until known

    def __post_init__(self):
        if not self.hub_repo_id:
            object.__setattr__(self, "hub_repo_id", f"{HUB_ORGANISATION}/{self.name}")
        if not self.reference_url:
            object.__setattr__(self, "reference_url", f"{REFERENCE_BASE_URL}/{self.name}.pth")

    @property
    def reference_miou(self) -> float:
        """The mIoU the reference gives for its published weights today (its newest figure)."""
        return self.miou_newest if self.miou_newest is not None else self.miou

    @property
    def reference_urls(self) -> list[str]:
        """The published file under each name the reference has used, newest first."""
        stem = self.reference_url.removesuffix(".pth")
        return [f"{stem}{suffix}.pth" for suffix in REFERENCE_FILE_SUFFIXES]

    @property
    def data(self) -> DatasetInfo:
        return DATASETS[self.dataset]

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def crop_size(self) -> tuple[int, int]:
        return self.data.crop_size

    @property
    def depth(self) -> int:
        return 101 if "101" in self.backbone else 50

    @property
    def title(self) -> str:
        return f"FCN R-{self.depth} OS{self.output_stride} {self.data.title}"

    def model_config(self) -> dict:
        """The keyword arguments of :class:`fcn_zoo.FCN` that build this checkpoint's architecture."""
        return {
            "num_classes": self.num_classes,
            "backbone": self.backbone,
            "output_stride": self.output_stride,
            "dataset": self.dataset,
        }


# The seed table of the reference model zoo: one row per published checkpoint. The figures
# (parameters, GFLOPs at data.typical_eval_shape, safetensors size) are recounted by tests/test_package.py.
_ROWS = (
    Checkpoint("fcn_resnet50os8_voc", "resnet50c", 8, "voc", batch_size=16, epochs=60, miou=66.86,
               params_m=35.34, gflops=401.1, weights_mb=160.5, miou_newest=67.80),
    Checkpoint("fcn_resnet50os16_voc", "resnet50c", 16, "voc", batch_size=16, epochs=60, miou=66.58,
               params_m=35.34, gflops=122.9, weights_mb=160.5),
    Checkpoint("fcn_resnet101os8_voc", "resnet101c", 8, "voc", batch_size=16, epochs=60, miou=69.86,
               params_m=54.33, gflops=609.6, weights_mb=236.7, miou_newest=70.59),
    Checkpoint("fcn_resnet101os16_voc", "resnet101c", 16, "voc", batch_size=16, epochs=60, miou=69.39,
               params_m=54.33, gflops=175.0, weights_mb=236.7),
    Checkpoint("fcn_resnet50os8_ade20k", "resnet50c", 8, "ade20k", batch_size=16, epochs=130, miou=36.96,
               params_m=35.4, gflops=401.8, weights_mb=161.0),
    Checkpoint("fcn_resnet50os16_ade20k", "resnet50c", 16, "ade20k", batch_size=16, epochs=130, miou=36.50,
               params_m=35.4, gflops=123.1, weights_mb=161.0),
    Checkpoint("fcn_resnet101os8_ade20k", "resnet101c", 8, "ade20k", batch_size=16, epochs=130, miou=41.22,
               params_m=54.39, gflops=610.3, weights_mb=237.2),
    Checkpoint("fcn_resnet101os16_ade20k", "resnet101c", 16, "ade20k", batch_size=16, epochs=130, miou=40.15,
               params_m=54.39, gflops=175.2, weights_mb=237.2),
    Checkpoint("fcn_resnet50os8_cityscapes", "resnet50c", 8, "cityscapes", batch_size=8, epochs=220, miou=75.16,
               params_m=35.34, gflops=2388.5, weights_mb=160.5),
    Checkpoint("fcn_resnet50os16_cityscapes", "resnet50c", 16, "cityscapes", batch_size=8, epochs=220, miou=73.94,
               params_m=35.34, gflops=732.3, weights_mb=160.5),
    Checkpoint("fcn_resnet101os8_cityscapes", "resnet101c", 8, "cityscapes", batch_size=8, epochs=220, miou=76.31,
               params_m=54.33, gflops=3629.7, weights_mb=236.7),
    Checkpoint("fcn_resnet101os16_cityscapes", "resnet101c", 16, "cityscapes", batch_size=8, epochs=220, miou=75.36,
               params_m=54.33, gflops=1042.6, weights_mb=236.7),
)

CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in _ROWS}


def get_checkpoint(name: str) -> Checkpoint:
    """Return the row called ``name``; an unknown name raises :class:`UnknownModelError` with suggestions."""
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise UnknownModelError(name, sorted(CHECKPOINTS)) from None


def checkpoint_for_file(path) -> Checkpoint | None:
    """The row a reference ``.pth`` is, from its file name (``<name>.pth`` or the older ``<name>_train.pth``)."""
    stem = os.path.basename(os.fspath(path)).removesuffix(".pth").removesuffix(".pt")
    for suffix in REFERENCE_FILE_SUFFIXES:
        name = stem[: len(stem) - len(suffix)]
        if stem.endswith(suffix) and name in CHECKPOINTS:
            return CHECKPOINTS[name]
    return None
