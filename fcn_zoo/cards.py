"""Model cards: one template for any FCN, filled from its ``config.json`` (and its zoo row, if it is one).

``python -m fcn_zoo.cards --out model_cards`` writes the twelve rows' cards. A card is huggingface_hub's
``ModelCard``: YAML front matter (licence, library, pipeline tag, datasets and, when an mIoU is known, a
``model-index``) followed by usage (Python, torch.hub, CLI), the architecture and its figures, results,
the recipe (zoo rows), the evaluation protocol, the classes and their colours, and provenance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .zoo import CHECKPOINTS, DATASETS, Checkpoint

__all__ = ["model_card", "row_card", "write_cards"]

REPO_URL = "https://github.com/fcn-zoo/fcn-zoo"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

FCN semantic segmentation (Long et al., [arXiv:1411.4038](https://arxiv.org/abs/1411.4038)){% if d %} trained on
{{ d.title }}{% endif %}: a timm `{{ cfg.backbone }}` backbone dilated to output stride {{ cfg.output_stride }}, an FCN head
({{ cfg.num_convs }} conv3x3, {{ cfg.head_channels }} channels{% if cfg.concat_input %}, concat-input{% endif %}) on the last stage
{%- if cfg.aux_channels %} and an auxiliary head on the stage before (training only){% endif %}, {{ cfg.num_classes }} classes.
{%- if provenance.get("run") %} The weights were trained with [fcn-zoo]({{ repo_url }})'s `training/`
{%- if row %}, which reproduces the recipe of the reference implementation,
[sssegmentation](https://github.com/SegmentationBLWX/sssegmentation){% endif %}.
{%- elif row and checked %} The weights are those the reference implementation,
[sssegmentation](https://github.com/SegmentationBLWX/sssegmentation), published as `{{ row.name }}.pth`,
converted to safetensors by [fcn-zoo]({{ repo_url }}).
{%- elif row %} The weights were converted by [fcn-zoo]({{ repo_url }}) from `{{ local_file }}`, a file named as the
reference's `{{ row.name }}.pth` whose sha256 was not found to be that file's: none of that row's figures are claimed.
{%- else %} It loads with [fcn-zoo]({{ repo_url }}).
{%- endif %}

## Usage

```python
import fcn_zoo

model = fcn_zoo.from_pretrained("{{ model_id }}")
seg = model.predict("image.jpg")      # a path, PIL image or RGB uint8 array; labels at the image's own size
seg.class_shares()                    # {class name: share of pixels}
seg.overlay().save("overlay.jpg")
```

```python
import torch

{% if row and model_id == row.name -%}
model = torch.hub.load("fcn-zoo/fcn-zoo", "{{ row.name }}")
{%- else -%}
model = torch.hub.load("fcn-zoo/fcn-zoo", "from_pretrained", "{{ model_id }}")
{%- endif %}
```

```bash
pip install "fcn-zoo @ git+{{ repo_url }}"
fcn-zoo predict {{ model_id }} image.jpg --out masks --overlay
```

## Model

| | |
|---|---|
| architecture | FCN, `{{ cfg.backbone }}` (timm), output stride {{ cfg.output_stride }} |
| classes | {{ cfg.num_classes }} |
{%- if num_params %}
| parameters | {{ "%.2f" % (num_params / 1e6) }} M (inference; the auxiliary head is used in training only) |
{%- endif %}
{%- if row and same_architecture %}
| compute | {{ "%.1f" % row.gflops }} GFLOPs per {{ row.data.typical_eval_shape[1] }}x{{ row.data.typical_eval_shape[0] }} image (a typical {{ d.title }} image at its evaluation size) |
| weights | {{ "%.1f" % row.weights_mb }} MB (`model.safetensors`, fp32) |
{%- endif %}
| input | RGB, normalised with mean ({{ cfg.mean | join(", ") }}) and std ({{ cfg.std | join(", ") }}) on 0..255 values |
| evaluation size | resize keeping the aspect ratio to fit {{ cfg.eval_size[0] }}x{{ cfg.eval_size[1] }} |
{%- if results %}

## Results

| dataset | split | protocol | mIoU |
|---|---|---|---:|
{%- for dataset, split, miou, source in results %}
| {{ dataset }} | {{ split }} | single scale, whole image | {{ "%.2f" % miou }} ({{ source }}) |
{%- endfor %}
{%- endif %}
{%- if provenance.get("per_class_iou") %}

Per-class IoU (%) of the measured mIoU:

| class | IoU |
|---|---:|
{%- for name, iou in provenance.per_class_iou.items() %}
| {{ name }} | {{ "%.2f" % iou if iou is not none else "absent from val" }} |
{%- endfor %}
{%- endif %}
{%- if row and checked %}

## Training

- Data: {{ d.title }} `{{ d.train_split }}`, {{ d.num_classes }} classes, ignore index {{ d.ignore_index }}.
- Pipeline: resize keeping ratio to {{ d.eval_size[0] }}x{{ d.eval_size[1] }} times a random scale in [0.5, 2.0]; random crop
  {{ row.crop_size[0] }}x{{ row.crop_size[1] }} (no class over 75% of it, up to 10 tries); horizontal flip; photometric distortion;
  normalise with mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on RGB; pad with ignore.
- Optimisation: SGD, lr {{ row.lr }}, momentum 0.9, weight decay 5e-4, poly decay (power 0.9, min lr 1e-4) per
  iteration; batch {{ row.batch_size }} over 8 GPUs with SyncBatchNorm; {{ row.epochs }} epochs.
- Loss: cross-entropy, plus 0.4 x the auxiliary head's cross-entropy.
- Initialisation: ImageNet ResNet-{{ row.depth }} V1c.
{%- endif %}

## Evaluation protocol

Resize keeping the aspect ratio so that the image fits {{ cfg.eval_size[0] }}x{{ cfg.eval_size[1] }}, normalise, one forward pass,
bilinear upsampling of the logits to the original size, argmax; mIoU from the dataset-level confusion
matrix. `model.predict(image)` does exactly this. Images are RGB: an OpenCV (BGR) array gives worse masks.

## Classes

| index | name | colour (RGB) |
|---:|---|---|
{% for name in cfg.class_names %}| {{ loop.index0 }} | {{ name }} | {{ cfg.palette[loop.index0] | join(", ") }} |
{% endfor %}
## Provenance
{% set run = provenance.get("run") or {} %}
{%- if run.get("init") %}
- Fine-tuned by `training/` at commit {{ run.commit }} from `{{ run.init }}` ({{ run.init_classes }} classes
  {%- if run.reinitialised_classifiers %}; its two classifiers re-initialised for these {{ cfg.num_classes }}{% else %}; every weight loaded{% endif %})
{%- if run.data.layout == "hub" %}
- Data: {% if run.data.local_folder %}a Hugging Face dataset folder{% else %}the Hugging Face dataset{% endif %} `{{ run.data.name }}`{% if run.data.config %} ({{ run.data.config }}){% endif %}
  {%- if run.data.revision %} at revision `{{ run.data.revision }}`{% endif %}, fingerprint `{{ run.data.fingerprint }}`,
  columns `{{ run.data.columns.image }}` (images) and `{{ run.data.columns.label }}` (masks{% if run.data.reduce_labels %}, labels reduced: 0 ignored, the rest moved down by one{% endif %});
  {{ run.data.train_images }} train rows of split `{{ run.data.train_split }}` and {{ run.data.val_images }} val rows (val: {{ run.data.val_split }});
  sha256 of the rows taken: train `{{ run.data.train_sha256 }}`, val `{{ run.data.val_sha256 }}`
{%- else %}
- Data: `{{ run.data.name }}` ({{ run.data.layout }} layout), {{ run.data.train_images }} train and {{ run.data.val_images }} val images
  (val: {{ run.data.val_split }}); sha256 of the sorted file lists: train `{{ run.data.train_sha256 }}`, val `{{ run.data.val_sha256 }}`
{%- endif %}
- Schedule: {{ run.max_iters }} iterations ({{ run.epochs }} epochs) of total batch {{ run.total_batch }} over {{ run.world_size }} process(es),
  SGD lr {{ run.lr }} with poly decay, crop {{ run.crop_size | join("x") }}, resize bound {{ run.scale | join("x") }} times 0.5-2.0,
  {{ run.precision }}{% if run.freeze_backbone %}, backbone frozen{% endif %}{% if run.class_weights %}, median-frequency class weights{% endif %}
{%- if run.get("selected") %}
- These are the weights of the {{ run.selected }} evaluation (iteration {{ run.iteration }} of {{ run.max_iters }}); the measured mIoU above is theirs
{%- endif %}
- `model.safetensors` sha256: {{ provenance.get("weights_sha256") }}
{%- elif run %}
- Trained by `training/` at commit {{ run.commit }}: {{ run.world_size }} process(es), total
  batch {{ run.total_batch }}, crop {{ run.crop_size | join("x") }}, {{ run.max_iters }} iterations, {{ run.precision }}, backbone
  initialised from {{ run.backbone_weights }}
- Evaluated on {{ run.val_samples_sha256 }} (sha256 of the val file list)
{%- if run.get("selected") %}
- These are the weights of the {{ run.selected }} evaluation (iteration {{ run.iteration }} of {{ run.max_iters }});
  the measured mIoU above is theirs{% if run.selected == "best" %} (the reference reports its last evaluation: `last/`){% endif %}
{%- endif %}
- `model.safetensors` sha256: {{ provenance.get("weights_sha256") }}
{%- elif row or provenance %}
{%- if row %}
- {% if local_file %}Converted from {{ local_file }}{% else %}Source: {{ provenance.get("source_url") or row.reference_url }}{% endif %}
- Source sha256: {{ provenance.get("source_sha256") or "recorded when the weights are converted" }}
- `model.safetensors` sha256: {{ provenance.get("weights_sha256") or "recorded when the weights are converted" }}
{%- else %}
{%- if provenance.get("source_file") or provenance.get("source_url") %}
- Converted from {{ provenance.get("source_url") or provenance.get("source_file") }} ({{ provenance.get("source_format") }} layout), sha256 {{ provenance.get("source_sha256") }}
{%- endif %}
- `model.safetensors` sha256: {{ provenance.get("weights_sha256") }}
{%- endif %}
{%- if provenance.get("parity") %}
- Parity with {{ "the reference implementation" if row else provenance.parity.implementation }} on the same input: max abs logit difference
  {{ "%.2e" % provenance.parity.max_abs_diff }}, label agreement {{ "%.4f" % provenance.parity.label_agreement }}
{%- elif row %}
- Parity with the reference implementation: measured when the weights are converted
{%- endif %}
{%- else %}
- Saved with `save_pretrained` by fcn-zoo.
{%- endif %}

## Citation

```bibtex
@inproceedings{long2015fully,
  title={Fully convolutional networks for semantic segmentation},
  author={Long, Jonathan and Shelhamer, Evan and Darrell, Trevor},
  booktitle={Proceedings of the IEEE conference on computer vision and pattern recognition},
  pages={3431--3440},
  year={2015}
}
```
"""

_ARCHITECTURE_DEFAULTS = {"head_channels": 512, "num_convs": 2, "concat_input": False, "aux_channels": 512}


def model_card(
    config: dict,
    *,
    row: Checkpoint | None = None,
    provenance: dict | None = None,
    mean_iou: float | None = None,
    eval_dataset: str | None = None,
    eval_split: str = "val",
    repo_id: str | None = None,
    num_params: int | None = None,
):
    """The ``huggingface_hub.ModelCard`` of any FCN.

    Args:
        config: the model's ``config.json`` (``FCN.hub_config()``): architecture, class names, palette,
            normalisation and evaluation size.
        row: the zoo row these weights are (reference weights, or a reproduction of its recipe), if any.
        provenance: what ``provenance.json`` records (source and its sha256, ``weights_sha256``, ``parity``,
            a training ``run``).
        mean_iou: an mIoU (%) measured with these weights on ``eval_dataset`` (a Hub dataset id or a name;
            default the row's or the config's dataset) split ``eval_split``; it goes into the ``model-index``.
        repo_id: the Hub repo the card is for, used in the usage examples.
        num_params: parameters of the inference network.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = {**_ARCHITECTURE_DEFAULTS, **config}
    provenance = provenance or {}
    data = row.data if row is not None else DATASETS.get(cfg.get("dataset") or "")
    if row is None and data is not None and data.num_classes != cfg["num_classes"]:
        data = None  # fine-tuned to other classes: the dataset named in the config no longer describes them
    if mean_iou is not None and eval_dataset is None and data is None:
        raise ValueError("mean_iou needs eval_dataset= (the Hub dataset id or name it was measured on)")
    # the row's figures hold for its own architecture, not for a smaller backbone trained with its recipe
    same_architecture = row is not None and all(
        cfg.get(k) == v for k, v in {**_ARCHITECTURE_DEFAULTS, **row.model_config()}.items() if k != "dataset"
    )
    if num_params is None and same_architecture:
        num_params = round(row.params_m * 1e6)
    # a local file named as a row (no download checked it) is that row's only if its sha256 is the row's known one
    local = provenance.get("source_file") and not provenance.get("source_url")
    local_file = Path(provenance["source_file"]).name if local else None
    checked = row is not None and (local_file is None or _is_row_file(row, provenance.get("source_sha256")))
    claims = same_architecture and checked
    # the row's own weights load by its name; a training run's (its recipe reproduced, or its weights fine-tuned) do not
    published = claims and not provenance.get("run")
    model_id = repo_id or (row.name if published else "OWNER/REPO")
    if row is not None and same_architecture:
        title = f"{row.title} (`{row.name}`)"
    else:  # from the config: a row converted at another output stride, or its recipe on another backbone, is not the row
        backbone = f"R-{row.depth}" if row is not None and cfg["backbone"] == row.backbone else cfg["backbone"]
        trained_on = f" {data.title}" if data else f", {cfg['num_classes']} classes"
        title = (f"FCN {backbone} OS{cfg['output_stride']}{trained_on}" + (f", from `{row.name}`" if row else "")
                 + (f" (`{repo_id}`)" if repo_id else ""))

    results = []  # (dataset, split, mIoU, source)
    if claims:  # the row's figures are its own architecture's, and its own file's
        results.append((data.title, data.val_split, row.miou, "reference, seed table"))
        if row.miou_newest is not None:
            results.append((data.title, data.val_split, row.miou_newest, "reference, newest"))
    if mean_iou is not None:
        results.append((eval_dataset or data.title, eval_split, mean_iou, "measured with these weights"))
    index_miou = mean_iou if mean_iou is not None else (row.reference_miou if claims else None)
    hub_dataset = eval_dataset if eval_dataset is not None else (data.hub_dataset if data else None)
    run_data = (provenance.get("run") or {}).get("data") or {}
    on_hub = run_data.get("layout", "hub") == "hub" and not run_data.get("local_folder")  # a folder is no Hub id
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="fcn-zoo",
        pipeline_tag="image-segmentation",
        tags=["semantic-segmentation", "fcn", "timm", "pytorch", "safetensors"],
        datasets=[hub_dataset] if hub_dataset and on_hub else None,
        model_name=row.name if published else (repo_id or (title if index_miou is not None else None)),
        eval_results=None if index_miou is None else [
            EvalResult(
                task_type="image-segmentation",
                task_name="Semantic Segmentation",
                dataset_type=hub_dataset,
                dataset_name=eval_dataset or data.title,
                dataset_split=eval_split if mean_iou is not None else data.val_split,
                metric_type="mean_iou",
                metric_name="mIoU",
                metric_value=round(index_miou, 2),
            )
        ],
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=title,
        cfg=cfg,
        row=row,
        d=data,
        model_id=model_id,
        repo_url=REPO_URL,
        provenance=provenance,
        results=results,
        same_architecture=same_architecture,
        checked=checked,
        local_file=local_file,
        num_params=num_params,
    )


def _is_row_file(row: Checkpoint, sha256: str | None) -> bool:
    from ._files import known_sha256
    from .errors import FCNZooError

    try:
        return sha256 is not None and sha256 == known_sha256(row)
    except FCNZooError:  # an unreadable known_hashes.json: no file is known
        return False


def row_card(checkpoint: Checkpoint, *, provenance: dict | None = None, mean_iou: float | None = None):
    """The card of a zoo row's weights (``mean_iou``: measured with them on the row's val split, if any)."""
    config = {**checkpoint.model_config(), **checkpoint.data.metadata()}
    return model_card(config, row=checkpoint, provenance=provenance, mean_iou=mean_iou)


def write_cards(out: Path) -> list[Path]:
    """Write ``<out>/<name>.md`` for every row; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for checkpoint in CHECKPOINTS.values():
        path = out / f"{checkpoint.name}.md"
        path.write_text(str(row_card(checkpoint)), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcn_zoo.cards", description="Write the zoo's model cards.")
    parser.add_argument("--out", type=Path, default=Path("model_cards"))
    args = parser.parse_args(argv)
    for path in write_cards(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
