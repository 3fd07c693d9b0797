"""Model cards for the zoo's checkpoints, generated from the table (``python -m fcn_zoo.cards --out model_cards``).

A card is huggingface_hub's ``ModelCard``: YAML front matter (licence, library, pipeline tag, datasets and a
``model-index`` with the reference mIoU) followed by a body with usage, classes, recipe, evaluation protocol
and provenance. Provenance figures (hashes, parity) are filled in when a card is written for converted weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .zoo import CHECKPOINTS, Checkpoint

__all__ = ["model_card", "write_cards"]

REPO_URL = "https://github.com/fcn-zoo/fcn-zoo"

TEMPLATE = """---
{{ card_data }}
---

# {{ c.title }} (`{{ c.name }}`)

FCN semantic segmentation (Long et al., [arXiv:1411.4038](https://arxiv.org/abs/1411.4038)) trained on
{{ d.title }}: a ResNet-{{ c.depth }} "V1c" backbone (timm `{{ c.backbone }}`, deep 3x3 stem) dilated to output
stride {{ c.output_stride }}, a two-conv FCN head on the last stage and an auxiliary head on the stage before
(training only).
{%- if provenance.get("run") %} The weights were trained with [fcn-zoo]({{ repo_url }})'s `training/`, which
reproduces the recipe of the reference implementation,
[sssegmentation](https://github.com/SegmentationBLWX/sssegmentation).
{%- else %} The weights are those the reference implementation,
[sssegmentation](https://github.com/SegmentationBLWX/sssegmentation), published as `{{ c.name }}.pth`,
converted to safetensors by [fcn-zoo]({{ repo_url }}).
{%- endif %}

## Usage

```python
import fcn_zoo

model = fcn_zoo.from_pretrained("{{ c.name }}")
seg = model.predict("image.jpg")      # labels at the image's own size
seg.overlay().save("overlay.jpg")
```

```python
import torch

model = torch.hub.load("fcn-zoo/fcn-zoo", "{{ c.name }}")
```

```bash
pip install "fcn-zoo @ git+{{ repo_url }}"
fcn-zoo predict {{ c.name }} image.jpg --out masks --overlay
```

## Results

| dataset | split | protocol | mIoU |
|---|---|---|---:|
| {{ d.title }} | {{ d.val_split }} | single scale, whole image | {{ "%.2f" % c.miou }} (reference) |
{%- if measured_miou is not none %}
| {{ d.title }} | {{ d.val_split }} | single scale, whole image | {{ "%.2f" % measured_miou }} (measured with these weights) |
{%- endif %}

## Training

- Data: {{ d.title }} `{{ d.train_split }}`, {{ d.num_classes }} classes, ignore index {{ d.ignore_index }}.
- Pipeline: resize keeping ratio to {{ d.eval_size[0] }}x{{ d.eval_size[1] }} times a random scale in [0.5, 2.0]; random crop
  {{ c.crop_size[0] }}x{{ c.crop_size[1] }} (no class over 75% of it, up to 10 tries); horizontal flip; photometric distortion;
  normalise with mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on RGB; pad with ignore.
- Optimisation: SGD, lr {{ c.lr }}, momentum 0.9, weight decay 5e-4, poly decay (power 0.9, min lr 1e-4) per
  iteration; batch {{ c.batch_size }} over 8 GPUs with SyncBatchNorm; {{ c.epochs }} epochs.
- Loss: cross-entropy, plus 0.4 x the auxiliary head's cross-entropy.
- Initialisation: ImageNet ResNet-{{ c.depth }} V1c.

## Evaluation protocol

Resize keeping the aspect ratio so that the image fits {{ d.eval_size[0] }}x{{ d.eval_size[1] }}, normalise, one forward pass,
bilinear upsampling of the logits to the original size, argmax; mIoU from the dataset-level confusion
matrix. `model.predict(image)` does exactly this.

## Classes

{% for name in d.classes %}{{ loop.index0 }}: {{ name }}{% if not loop.last %}; {% endif %}{% endfor %}

## Provenance
{% if provenance.get("run") %}
- Trained by `training/` at commit {{ provenance.run.commit }}: {{ provenance.run.world_size }} process(es), total
  batch {{ provenance.run.total_batch }}, crop {{ provenance.run.crop_size | join("x") }}, {{ provenance.run.max_iters }} iterations, {{ provenance.run.precision }}, backbone
  initialised from {{ provenance.run.backbone_weights }}
- Evaluated on {{ provenance.run.val_samples_sha256 }} (sha256 of the val file list)
- `model.safetensors` sha256: {{ provenance.get("weights_sha256") }}
{%- else %}
- Source: {{ c.reference_url }}
- Source sha256: {{ provenance.get("source_sha256") or "recorded when the weights are converted" }}
- `model.safetensors` sha256: {{ provenance.get("weights_sha256") or "recorded when the weights are converted" }}
{%- if provenance.get("parity") %}
- Parity with the reference implementation on the same input: max abs logit difference
  {{ "%.2e" % provenance.parity.max_abs_diff }}, label agreement {{ "%.4f" % provenance.parity.label_agreement }}
{%- else %}
- Parity with the reference implementation: measured when the weights are converted
{%- endif %}
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


def model_card(checkpoint: Checkpoint, *, provenance: dict | None = None, measured_miou: float | None = None):
    """The ``huggingface_hub.ModelCard`` of one row.

    Args:
        provenance: ``source_sha256``, ``weights_sha256`` and ``parity`` (``max_abs_diff``,
            ``label_agreement``) of converted weights, if known.
        measured_miou: mIoU (%) measured with these weights on the val split, if any.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    data = checkpoint.data
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="fcn-zoo",
        pipeline_tag="image-segmentation",
        tags=["semantic-segmentation", "fcn", "timm", "pytorch", "safetensors"],
        datasets=[data.hub_dataset],
        model_name=checkpoint.name,
        eval_results=[
            EvalResult(
                task_type="image-segmentation",
                task_name="Semantic Segmentation",
                dataset_type=data.hub_dataset,
                dataset_name=data.title,
                dataset_split=data.val_split,
                metric_type="mean_iou",
                metric_name="mIoU",
                metric_value=round(measured_miou if measured_miou is not None else checkpoint.miou, 2),
            )
        ],
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        c=checkpoint,
        d=data,
        repo_url=REPO_URL,
        provenance=_AttrDict(provenance or {}),
        measured_miou=measured_miou,
    )


def write_cards(out: Path) -> list[Path]:
    """Write ``<out>/<name>.md`` for every row; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for checkpoint in CHECKPOINTS.values():
        path = out / f"{checkpoint.name}.md"
        path.write_text(str(model_card(checkpoint)), encoding="utf-8")
        paths.append(path)
    return paths


class _AttrDict(dict):
    def __getattr__(self, name):
        value = self[name]
        return _AttrDict(value) if isinstance(value, dict) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcn_zoo.cards", description="Write the zoo's model cards.")
    parser.add_argument("--out", type=Path, default=Path("model_cards"))
    args = parser.parse_args(argv)
    for path in write_cards(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
