"""Where training data comes from, behind one interface: a :class:`SegmentationDataset` per split and a
:class:`TrainingData` for a fine-tuning run. Each kind of source is one module that builds them:

- :mod:`training.layouts`: the zoo's datasets in their real layouts (VOC, ADE20K, Cityscapes);
- :mod:`training.generic`: your own folder (``classes.txt``, ``images/``, ``masks/``);
- :mod:`training.hubdata`: a Hugging Face dataset (on the Hub, a dataset-repo folder or ``save_to_disk``).

:mod:`training.sources` picks one from the command line. This module imports none of them.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fcn_zoo.errors import ImageError
from fcn_zoo.images import displayed_size, read_image, read_mask
from fcn_zoo.metrics import IGNORE_INDEX


LAYOUTS = {
    "voc": "VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt} "
    "(or mmsegmentation's SegmentationClassAug with train.txt + aug.txt)",
    "ade20k": "ADEChallengeData2016/{images,annotations}/{training,validation}/<id>.{jpg,png}",
    "cityscapes": "leftImg8bit/<split>/<city>/<id>_leftImg8bit.png and gtFine/<split>/<city>/<id>_gtFine_labelIds.png",
    "generic": "DATA/classes.txt, DATA/images/{train,val}/<id>.jpg|png and DATA/masks/{train,val}/<id>.png",
}

# where each layout's test images are (no labels: the benchmark's server holds them)
TEST_LAYOUTS = {
    "voc": "VOCdevkit/VOC2012/{ImageSets/Segmentation/test.txt, JPEGImages/<id>.jpg} (VOC2012test.tar)",
    "ade20k": "release_test/testing/<id>.jpg (the challenge's release_test.zip)",
    "cityscapes": "leftImg8bit/test/<city>/<id>_leftImg8bit.png",
    "generic": "DATA/classes.txt and DATA/images/test/<id>.jpg|png",
}


class DatasetLayoutError(FileNotFoundError):
    """A file the dataset layout needs is missing or unreadable."""


class SegmentationDataset(torch.utils.data.Dataset):
    """Pairs of (image, label map) files, a lookup table from stored label values to train ids, and transforms.
    Another kind of storage subclasses it, replacing :meth:`image`, :meth:`raw_label`, :meth:`where` and
    :meth:`fingerprint` (:class:`training.hubdata.HubDataset`).

    ``transforms(image, label, generator)`` receives a uint8 ``(3, H, W)`` tensor, an int64 ``(H, W)``
    tensor and a ``torch.Generator`` seeded from (seed, epoch, index): the augmentation of a sample is the
    same whichever worker loads it and whether or not training was resumed.
    """

    lookup_note = ""  # how stored values become train ids, for messages (" after --reduce-labels")
    classes_note = ""  # where the classes come from, for messages (" of classes.txt")

    def __init__(self, name: str, samples: list[tuple[Path, Path]], lookup: np.ndarray, transforms=None, seed: int = 0,
                 *, class_names: list[str] | None = None, ids: list[str] | None = None):
        from fcn_zoo.zoo import DATASETS

        known = DATASETS.get(name)
        self.name = name
        self.class_names = list(class_names) if class_names is not None else list(known.classes)
        self.num_classes = len(self.class_names)
        self.eval_size = known.eval_size if known else None  # None: the model's own
        self.samples = samples
        self.ids = ids
        self.lookup = lookup
        # stored values that map to no class and are not ignored (only an identity lookup, VOC's, has any)
        self.invalid = (lookup >= self.num_classes) & (lookup != IGNORE_INDEX)
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]):
        """Sample ``index``; ``(epoch, index)`` names the epoch too (what loader processes that live for the
        whole run are handed: their copy of the dataset never sees :meth:`set_epoch`)."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image = torch.from_numpy(self.image(index)).permute(2, 0, 1).contiguous()
        label = torch.from_numpy(self.label(index).astype(np.int64))
        check_sizes(tuple(image.shape[1:]), tuple(label.shape), self.where(index))
        if self.transforms is not None:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{index}".encode()))
            image, label = self.transforms(image, label, generator)
        return image, label

    def image(self, index: int) -> np.ndarray:
        """Sample ``index``'s image as a uint8 ``(H, W, 3)`` RGB array, as :func:`fcn_zoo.images.read_image`
        reads it for inference (EXIF orientation applied, 16-bit scaled)."""
        return read_image_as(self.samples[index][0], self.name)

    def raw_label(self, index: int) -> np.ndarray:
        """Sample ``index``'s label map as stored, a uint8 ``(H, W)`` array."""
        if self.samples[index][1] is None:
            raise DatasetLayoutError(f"{self.where(index)}: a test image has no labels to score or train on")
        return read_label(self.samples[index][1], self.name)

    def image_size(self, index: int) -> tuple[int, int]:
        """Sample ``index``'s image ``(width, height)`` as displayed, from its header alone."""
        try:
            return displayed_size(self.samples[index][0])
        except ImageError as e:
            raise DatasetLayoutError(_with_layout(str(e), self.name)) from None

    def where(self, index: int) -> str:
        """Where sample ``index``'s label is (a test sample's image), for messages."""
        image, label = self.samples[index]
        return str(label if label is not None else image)

    def label(self, index: int) -> np.ndarray:
        """The train ids of sample ``index`` as a uint8 ``(H, W)`` array (255 = ignore), without its image."""
        raw = self.raw_label(index)
        invalid = self.invalid[raw]
        if invalid.any():
            stored = np.unique(raw[invalid]).tolist()[:5]
            mapped = np.unique(self.lookup[raw][invalid]).tolist()[:5]
            after = f"{self.lookup_note} {mapped}" if mapped != stored else ""
            raise DatasetLayoutError(
                f"{self.where(index)}: label values {stored}{after} are outside the {self.num_classes} classes{self.classes_note} "
                f"(0..{self.num_classes - 1}, {IGNORE_INDEX} = ignore)"
            )
        return self.lookup[raw]

    def fingerprint(self, count: int | None = None) -> str:
        """sha256 of the list of (image, label) file names (of the sorted ids in the generic layout): which
        files an evaluation used; ``count``: of the first ``count`` samples only (``--max-samples``)."""
        if self.ids is not None:
            text = "\n".join(sorted(self.ids[:count]))
        else:
            text = "\n".join(f"{i.name} {label.name}" if label else i.name for i, label in self.samples[:count])
        return hashlib.sha256(text.encode()).hexdigest()

    def checked_labels(self, indices, sizes: list, progress: bool = False):
        """The train ids of samples ``indices``, each checked before training starts: its mask against its
        image's size as displayed (the header only: no pixels decoded) and against the classes; every image's
        ``(height, width)`` appended to ``sizes``. A sample that fails is an error naming it."""
        from tqdm.auto import tqdm

        for index in tqdm(indices, desc=f"checking {getattr(self, 'split', 'masks')}", disable=not progress, leave=False):
            width, height = self.image_size(index)
            label = self.label(index)
            image = f"its image {Path(self.samples[index][0]).name}" if self.samples else "its image"
            check_sizes((height, width), label.shape, self.where(index), image)
            sizes.append((height, width))
            yield label

    def class_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`class_pixels` of every label of the dataset."""
        return class_pixels((self.label(i) for i in range(len(self))), self.num_classes)


@dataclass
class TrainingData:
    """What a source gives a fine-tuning run, checked in full: both splits (``transforms`` unset), the class
    names and colours (``None``: the model's defaults), what ``run.json`` and the card record about the data
    (``record``), and from the check of every sample the training set's class pixel counts and image sizes."""

    layout: str  # generic, voc, ade20k, cityscapes or hub
    train: SegmentationDataset
    val: SegmentationDataset
    class_names: list[str]
    palette: list[tuple[int, int, int]] | None
    record: dict
    pixels: tuple[np.ndarray, np.ndarray] | None = None  # class_pixels() of the training set, if the check counted them
    sizes: list[tuple[int, int]] | None = None  # (height, width) of each training image, if the check read them


@dataclass
class Classes:
    names: list[str]
    palette: list[tuple[int, int, int]] | None  # None: no colours given


def read_classes_file(path: str | Path) -> Classes:
    """A ``classes.txt`` file anywhere (``--classes FILE``): a name per line, optionally ``R G B``. Colours are
    given on every line or on none; without any, a whole line is a name (``level 2`` too)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: no such file; write one class name per line, in index order")
    lines = []
    # utf-8-sig: a byte order mark (Notepad's) is not part of the first name
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            lines.append((number, text, text.split()))
    coloured = any(_colour(parts) for _, _, parts in lines)
    names, colours = [], []
    for number, text, parts in lines:
        rgb = _colour(parts) if coloured else None
        if rgb is not None:
            if max(rgb) > 255:
                raise DatasetLayoutError(f"{path}:{number}: colour {rgb} is outside 0..255")
            names.append(" ".join(parts[:-3]))
        elif coloured and _is_number(parts[-1]):  # one or two numbers, or no name before them: a colour cut short
            raise DatasetLayoutError(f"{path}:{number}: the colour of {text!r} is malformed; give the name, then R G B "
                                     "(three numbers 0..255)")
        else:
            names.append(text)
        colours.append(rgb)
    if not names:
        raise DatasetLayoutError(f"{path}: no class names; write one per line, in index order")
    if len(names) > IGNORE_INDEX:
        raise DatasetLayoutError(f"{path}: {len(names)} classes; masks hold 0..254 (255 = ignore)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetLayoutError(f"{path}: class names appear twice: {', '.join(duplicates)}")
    given = [c is not None for c in colours]
    if any(given) and not all(given):
        line = given.index(False) + 1
        raise DatasetLayoutError(f"{path}: class {line - 1} ({names[line - 1]}) has no colour; give R G B on every line or on none")
    return Classes(names, colours if all(given) else None)


def _is_number(text: str) -> bool:
    """ASCII digits only (``"²"`` and ``"٣"`` are no colour values)."""
    return text.isascii() and text.isdecimal()


def _colour(parts: list[str]) -> tuple[int, int, int] | None:
    """The ``R G B`` that ends a line of a name and a colour, or None."""
    if len(parts) >= 4 and all(_is_number(p) for p in parts[-3:]):
        return tuple(int(p) for p in parts[-3:])
    return None


def unit_hash(text: str) -> float:
    """``text``'s sha256 read as a number in [0, 1): which side of a held-out split a sample falls on, whatever
    the other samples are."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def class_pixels(labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its pixels in ``labels`` (uint8 maps of train ids), and the (non-ignored) pixels of the
    maps where it occurs: what median frequency balancing needs."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for label in labels:
        counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += counts.sum()
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> list[float]:
    """Median frequency balancing (Eigen & Fergus 2015): ``median(f) / f_c`` with ``f_c`` the ``pixels`` of
    class c over the ``image_pixels`` of the images where c occurs; classes that never occur get 1."""
    present = pixels > 0
    if not present.any():
        return [1.0] * len(pixels)
    frequency = np.where(present, pixels / np.maximum(image_pixels, 1), 0.0)
    median = float(np.median(frequency[present]))
    return [round(median / f, 6) if p else 1.0 for f, p in zip(frequency.tolist(), present.tolist())]



def read_image_as(source, dataset: str, where: str | None = None) -> np.ndarray:
    """:func:`fcn_zoo.images.read_image`, its error said as a dataset's (what the layout expects)."""
    try:
        return read_image(source, where)
    except ImageError as e:
        raise DatasetLayoutError(_with_layout(str(e), dataset)) from None


def read_label(source, dataset: str, where: str | None = None) -> np.ndarray:
    """A label map as a uint8 ``(H, W)`` array of its stored values (:func:`fcn_zoo.images.read_mask`)."""
    try:
        return read_mask(source, where)
    except ImageError as e:
        raise DatasetLayoutError(_with_layout(str(e), dataset)) from None


def _with_layout(message: str, dataset: str) -> str:
    if dataset in LAYOUTS and "cannot read" in message:
        return f"{message}; expected {LAYOUTS[dataset]}"
    return message


def check_sizes(image: tuple[int, int], mask: tuple[int, int], where: str, image_name: str = "its image") -> None:
    """A mask is drawn on the image as displayed: the same ``(height, width)``, or an error that says which."""
    if image == mask:
        return
    hint = ""
    if image == mask[::-1]:
        hint = ("; the image is shown turned by its EXIF orientation: draw masks on the photo as displayed, or "
                "remove the orientation from the image (PIL: ImageOps.exif_transpose(img).save(...))")
    raise DatasetLayoutError(f"{where}: mask is {mask[1]}x{mask[0]}, {image_name} is {image[1]}x{image[0]} as displayed{hint}")


class TimedSamples(torch.utils.data.Dataset):
    """``dataset`` with the time each loader process spends making samples counted in shared memory: the data
    pipeline's own rate (decoding, augmenting), which training logs beside the step's to say which one
    bounds the run. ``workers``: the loader's processes (0: the samples are made in this process)."""

    def __init__(self, dataset: torch.utils.data.Dataset, workers: int):
        self.dataset = dataset
        self.clock = torch.zeros(max(workers, 1), 2, dtype=torch.float64).share_memory_()  # per process: seconds, samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        start = time.perf_counter()
        sample = self.dataset[key]
        info = torch.utils.data.get_worker_info()
        self.clock[info.id if info is not None else 0] += torch.tensor([time.perf_counter() - start, 1.0], dtype=torch.float64)
        return sample

    def rate(self, since: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """Samples per second the loader's processes make together when none waits (each one's samples over
        its seconds, summed), since the ``clock`` returned by an earlier call; and the clock now."""
        now = self.clock.clone()
        seconds, samples = (now - since if since is not None else now).unbind(1)
        busy = seconds > 0
        return float((samples[busy] / seconds[busy]).sum()), now


class RunSampler(torch.utils.data.Sampler):
    """The ``(epoch, index)`` keys of every sample the rest of a run draws, from iteration ``start`` to ``stop``,
    ``per_step`` per iteration: in each epoch the permutation of ``sampler`` (a ``DistributedSampler``, set to
    the epoch), repeated to fill the epoch's iterations as the reference's padded sampler does, and cut where
    a resumed run starts. One loader iterates it for the whole run, so its processes start once."""

    def __init__(self, sampler, start: int, stop: int, iters_per_epoch: int, per_step: int):
        self.sampler, self.start, self.stop = sampler, start, stop
        self.iters_per_epoch, self.per_step = iters_per_epoch, per_step

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.per_step

    def __iter__(self):
        it = self.start
        while it < self.stop:
            epoch, step = divmod(it, self.iters_per_epoch)
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            needed = self.iters_per_epoch * self.per_step
            indices = indices * -(-needed // len(indices))
            end = min(self.iters_per_epoch, step + self.stop - it)
            yield from ((epoch, i) for i in indices[step * self.per_step:end * self.per_step])
            it = epoch * self.iters_per_epoch + end
