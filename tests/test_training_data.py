"""training/: the datasets in their real layouts and the reference train pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sample_data import make_ade20k, make_cityscapes, make_generic, make_voc
from training.data import DatasetLayoutError
from training.sources import build_dataset
from training.transforms import PadToSize, RandomCrop, RandomResize, train_transforms


@pytest.mark.parametrize("layout", ["reference", "mmseg"])
def test_voc_layouts_read_the_same_labels(tmp_path, layout):
    make_voc(tmp_path, layout=layout)
    train = build_dataset("voc", tmp_path, "train")
    val = build_dataset("voc", tmp_path, "val")
    assert (len(train), len(val)) == (8, 4)
    image, label = train[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 80) and label.shape == (64, 80)
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255} and (label[0] == 255).all()
    if layout == "mmseg":
        assert "SegmentationClassAug" in str(train.samples[-1][1]) and "SegmentationClassAug" not in str(train.samples[0][1])


def test_ade20k_reduces_the_zero_label(tmp_path):
    make_ade20k(tmp_path)
    dataset = build_dataset("ade20k", tmp_path, "train")
    raw = np.asarray(Image.open(dataset.samples[0][1]))
    _, label = dataset[0]
    assert (label[raw == 0] == 255).all()
    assert (label[raw == 2] == 1).all()  # ADE20K's 2 (building) is class 1


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    dataset = build_dataset("cityscapes", tmp_path, "val")
    raw = np.asarray(Image.open(dataset.samples[0][1]))
    _, label = dataset[0]
    assert (label[raw == 7] == 0).all() and (label[raw == 26] == 13).all() and (label[raw == 1] == 255).all()


def test_missing_files_name_the_file_and_the_layout(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000003.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"2007_000003.jpg: missing.*ImageSets/Segmentation"):
        build_dataset("voc", tmp_path, "train")
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016"):
        build_dataset("ade20k", tmp_path, "train")


def test_labels_outside_the_classes_are_an_error_naming_the_file(tmp_path):
    make_voc(tmp_path)
    dataset = build_dataset("voc", tmp_path, "val")
    Image.fromarray(np.full((64, 80), 77, dtype=np.uint8)).save(dataset.samples[0][1])
    with pytest.raises(DatasetLayoutError, match=r"2007_000008.png: label values \[77\]"):
        dataset[0]


def test_16_bit_label_pngs_are_read_like_8_bit_ones_within_0_to_255(tmp_path):
    make_voc(tmp_path)
    dataset = build_dataset("voc", tmp_path, "val")
    path = dataset.samples[0][1]
    expected = dataset[0][1]
    Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16)).save(path)  # same values, 16-bit PNG
    assert Image.open(path).mode.startswith("I") and torch.equal(dataset[0][1], expected)
    Image.fromarray(np.full((64, 80), 300, dtype=np.uint16)).save(path)
    with pytest.raises(DatasetLayoutError, match=r"2007_000008.png: label values must be 0..255, found 300..300"):
        dataset[0]


def test_the_train_pipeline_is_reproducible_per_sample_and_epoch(tmp_path):
    make_voc(tmp_path)
    transforms = train_transforms((256, 64), (48, 48), (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    dataset = build_dataset("voc", tmp_path, "train", transforms, seed=3)
    a_img, a_lab = dataset[2]
    b_img, b_lab = dataset[2]
    assert a_img.shape == (3, 48, 48) and a_lab.shape == (48, 48) and a_img.dtype == torch.float32
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2][0], a_img)


def test_portrait_images_under_a_landscape_crop_give_samples_of_the_crops_shape(tmp_path):
    """--crop-size 32 64 on portrait images: every sample is 32x64, so a batch stacks."""
    make_generic(tmp_path, n_train=4, n_val=1, size=(60, 20))
    transforms = train_transforms((60, 20), (32, 64), (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    dataset = build_dataset("generic", tmp_path, "train", transforms)
    shapes = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        shapes |= {(tuple(image.shape), tuple(label.shape)) for image, label in (dataset[i] for i in range(len(dataset)))}
    assert shapes == {((3, 32, 64), (32, 64))}
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 32, 64) and labels.shape == (4, 32, 64)


def test_resize_crop_and_pad_keep_image_and_label_aligned():
    g = torch.Generator().manual_seed(0)
    image = torch.arange(60 * 90, dtype=torch.float32).view(1, 60, 90).expand(3, -1, -1).round().to(torch.uint8)
    label = torch.zeros(60, 90, dtype=torch.int64)
    label[:, 45:] = 1
    image[:, :, 45:] = 255
    image[:, :, :45] = 0
    big_image, big_label = RandomResize((400, 100), (1.0, 1.0))(image, label, g)
    assert big_label.shape == (100, 150) and big_image.shape[1:] == (100, 150)
    # where the label says 1 the image is bright, except at the bilinear seam
    assert (big_image[0][big_label == 1] > 128).float().mean() > 0.98
    crop_image, crop_label = RandomCrop((80, 80))(big_image, big_label, g)
    assert crop_label.shape == (80, 80) and len(crop_label.unique()) == 2  # one class never fills >= 75%
    padded_image, padded_label = PadToSize((96, 96))(crop_image.float(), crop_label, g)
    assert padded_image.shape[1:] == (96, 96) and (padded_label[88:] == 255).all() and (padded_image[:, :8] == 0).all()
    assert torch.equal(padded_label[8:88, 8:88], crop_label)  # around the centre


def _reference_draws(monkeypatch, call):
    """Run ``call`` with numpy's global RNG recorded: the reference's draws, in order."""
    draws = []
    randint, uniform = np.random.randint, np.random.uniform
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: draws.append(randint(*a, **k)) or draws[-1])
    monkeypatch.setattr(np.random, "uniform", lambda *a, **k: draws.append(uniform(*a, **k)) or draws[-1])
    result = call()
    monkeypatch.undo()
    return result, draws


def test_photometric_distortion_is_the_references_given_the_same_draws(monkeypatch):
    from ssseg.modules.datasets.pipelines.transforms import PhotoMetricDistortion as Reference

    import training.transforms as ours

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image[:16] = rng.integers(0, 40, (16, 64, 3), dtype=np.uint8)  # dark, saturated and grey areas too
    image[16:24] = 128
    applied = set()
    for seed in range(40):
        np.random.seed(seed)
        expected, draws = _reference_draws(monkeypatch, lambda: Reference()({"image": image.copy()})["image"])
        replay = iter(draws)
        monkeypatch.setattr(ours, "_randint", lambda g, low, high: next(replay))
        monkeypatch.setattr(ours, "_uniform", lambda g, low, high: next(replay))
        got, _ = ours.PhotoMetricDistortion()(torch.from_numpy(image).permute(2, 0, 1), None, None)
        monkeypatch.undo()
        assert next(replay, None) is None, "ours drew less than the reference"
        difference = np.abs(got.permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).max()
        assert difference <= 1, (seed, difference)  # measured: 0
        applied.add(tuple(draws[i] for i in range(0, len(draws), 2)))
    assert len(applied) > 10  # the seeds took many different paths through the steps


def test_padding_is_the_references(monkeypatch):
    """The reference's Padding where the image's orientation is the crop's (or the crop is square); a
    portrait image under a landscape crop is padded to the crop's shape, not the transposed one, so that
    every sample of a batch has one shape."""
    from ssseg.modules.datasets.pipelines.transforms import Padding

    g = torch.Generator().manual_seed(0)
    image, label = torch.randn(3, 30, 20), torch.randint(0, 3, (30, 20))
    padded_image, padded_label = PadToSize((32, 64))(image, label, g)
    assert padded_image.shape == (3, 32, 64) and torch.equal(padded_label[1:31, 22:42], label)
    assert (padded_label[:, :22] == 255).all() and (padded_image[:, :, 42:] == 0).all()
    for (h, w), size in [((30, 41), (48, 48)), ((20, 37), (32, 64)), ((37, 20), (64, 32)), ((48, 48), (48, 48))]:
        image = torch.randn(3, h, w)
        label = torch.randint(0, 3, (h, w))
        reference = Padding(size, data_type="tensor")({"image": image.clone(), "seg_target": label.clone()})
        padded_image, padded_label = PadToSize(size)(image, label, g)
        assert torch.equal(padded_image, reference["image"])
        assert torch.equal(padded_label, reference["seg_target"].masked_fill(reference["seg_target"] == -100, 255))


def test_prepare_sbd_writes_labels_and_trainaug(tmp_path):
    from scipy.io import savemat

    from training.prepare import main

    make_voc(tmp_path, n_train=4, n_val=2)
    sets = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (sets / "train.txt").write_text("2007_000000\n2007_000001\n")
    (sets / "trainaug.txt").unlink()
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    segmentation = np.zeros((64, 80), dtype=np.uint8)
    segmentation[10:30, 10:40] = 12  # dog
    for image_id in ("2007_000002", "2007_000003", "2007_000004"):  # 2007_000004 is in VOC val: left out
        savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": segmentation, "Boundaries": np.zeros(1)}})
    (sbd / "train.txt").write_text("2007_000002\n2007_000003\n")
    (sbd / "val.txt").write_text("2007_000004\n")
    labels = tmp_path / "VOCdevkit/VOC2012/SegmentationClass"
    (labels / "2007_000002.png").unlink()
    (labels / "2007_000003.png").unlink()

    assert main(["sbd", "--sbd", str(tmp_path / "benchmark_RELEASE"), "--data-root", str(tmp_path)]) == 0

    assert (sets / "trainaug.txt").read_text().split() == ["2007_000000", "2007_000001", "2007_000002", "2007_000003"]
    written = Image.open(labels / "2007_000002.png")
    assert written.mode == "P" and np.array_equal(np.asarray(written), segmentation)
    train = build_dataset("voc", tmp_path, "train")
    assert len(train) == 4 and (train[2][1][10:30, 10:40] == 12).all()


class _Slow(torch.utils.data.Dataset):
    """Samples that take 10 ms each to make."""

    def __len__(self):
        return 40

    def __getitem__(self, index):
        import time

        time.sleep(0.01)
        return torch.tensor(index)


@pytest.mark.parametrize("workers", [0, 2])
def test_timed_samples_measure_the_pipelines_own_rate(workers):
    """The loader's processes record their time in shared memory: 10 ms a sample is ~100 samples/s per
    process, whatever the consumer does with them (here it waits 30 ms a batch: it is the bound)."""
    import time

    from training.data import TimedSamples

    timed = TimedSamples(_Slow(), workers)
    _, start = timed.rate()
    loader = torch.utils.data.DataLoader(timed, batch_size=4, num_workers=workers)
    seen = []
    for batch in loader:
        seen += batch.tolist()
        time.sleep(0.03)
    rate, clock = timed.rate(start)
    assert sorted(seen) == list(range(40)) and int(clock[:, 1].sum()) == 40
    per_process = 1 / 0.01
    assert 0.4 * per_process * max(workers, 1) < rate < 1.05 * per_process * max(workers, 1), rate


def test_mmsegs_aug_list_holding_the_train_ids_gives_each_id_once(tmp_path):
    from training.layouts import zoo_dataset

    make_voc(tmp_path, n_train=6, n_val=2, layout="mmseg")
    sets = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    train_ids = (sets / "train.txt").read_text().split()
    aug_ids = (sets / "aug.txt").read_text().split()
    (sets / "aug.txt").write_text("\n".join(train_ids + aug_ids) + "\n")  # as mmsegmentation's converter writes it
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for i in train_ids:  # the train ids' SBD labels too
        (base / "SegmentationClassAug" / f"{i}.png").write_bytes((base / "SegmentationClass" / f"{i}.png").read_bytes())
    dataset = zoo_dataset("voc", tmp_path, "train")
    assert sorted(p.stem for p, _ in dataset.samples) == sorted(train_ids + aug_ids)
    assert all(label.parent.name == "SegmentationClass" for p, label in dataset.samples if p.stem in train_ids)
    with pytest.raises(ValueError, match="unknown split 'trainval'"):
        zoo_dataset("voc", tmp_path, "trainval")
