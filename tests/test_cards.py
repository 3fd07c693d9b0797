"""Model cards: one template for any FCN, parseable by huggingface_hub; the zoo's committed copies up to date."""

from __future__ import annotations

from pathlib import Path

import json

import pytest
from huggingface_hub import ModelCard

import fcn_zoo
from conftest import tiny_fcn
from fcn_zoo.cards import row_card, write_cards

COMMITTED = Path(__file__).resolve().parents[1] / "model_cards"


def test_committed_cards_are_what_the_generator_writes_now(tmp_path):
    generated = {p.name: p.read_text() for p in write_cards(tmp_path)}
    committed = {p.name: p.read_text() for p in COMMITTED.glob("*.md")}
    assert sorted(committed) == sorted(generated), "run: python -m fcn_zoo.cards --out model_cards"
    stale = [name for name in generated if committed[name] != generated[name]]
    assert stale == [], f"stale cards {stale}; run: python -m fcn_zoo.cards --out model_cards"


@pytest.mark.parametrize("name", fcn_zoo.list_models())
def test_card_metadata_parses_with_the_right_model_index(name):
    row = fcn_zoo.CHECKPOINTS[name]
    card = ModelCard.load(COMMITTED / f"{name}.md")
    assert card.data.library_name == "fcn-zoo" and card.data.pipeline_tag == "image-segmentation"
    assert card.data.datasets == [row.data.hub_dataset]
    (result,) = card.data.eval_results  # the figure the reference gives for its published weights today
    assert (result.metric_type, result.metric_value) == ("mean_iou", row.miou_newest or row.miou)
    assert (result.dataset_type, result.dataset_split) == (row.data.hub_dataset, "val")
    assert f"{row.miou:.2f} (reference, seed table)" in card.text
    assert row.miou_newest is None or f"{row.miou_newest:.2f} (reference, newest)" in card.text
    assert all(f"| {i} | {c} | {', '.join(map(str, rgb))} |" in card.text
               for i, (c, rgb) in enumerate(zip(row.data.classes, row.data.palette)))
    assert f"{row.params_m:.2f} M" in card.text and f"{row.gflops:.1f} GFLOPs" in card.text and f"{row.weights_mb:.1f} MB" in card.text
    assert row.reference_url in card.text and f'from_pretrained("{name}")' in card.text
    assert f'torch.hub.load("fcn-zoo/fcn-zoo", "{name}")' in card.text and f"fcn-zoo predict {name} " in card.text


def test_the_newest_reference_figures_are_those_of_the_two_rows_that_changed():
    newest = {name: row.miou_newest for name, row in fcn_zoo.CHECKPOINTS.items() if row.miou_newest is not None}
    assert newest == {"fcn_resnet50os8_voc": 67.80, "fcn_resnet101os8_voc": 70.59}
    assert fcn_zoo.CHECKPOINTS["fcn_resnet50os8_voc"].miou == 66.86  # the seed table's figure is kept


def test_provenance_and_measured_miou_appear_when_known():
    row = fcn_zoo.CHECKPOINTS["fcn_resnet50os8_cityscapes"]
    card = row_card(
        row,
        provenance={"source_sha256": "a" * 64, "weights_sha256": "b" * 64,
                    "parity": {"max_abs_diff": 3.2e-6, "label_agreement": 0.99991}},
        mean_iou=75.02,
    )
    text = str(card)
    assert "a" * 64 in text and "b" * 64 in text and "3.20e-06" in text and "0.9999" in text
    assert "75.02 (measured" in text
    assert card.data.eval_results[0].metric_value == 75.02


def test_save_pretrained_writes_a_card_of_its_own_with_the_metrics_the_user_measured(tmp_path):
    model = tiny_fcn(num_classes=3, dataset=None)
    model.class_names = ["sky", "road, street", "tree"]
    model.save_pretrained(tmp_path / "mine", mean_iou=61.234, eval_dataset="me/streets", eval_split="test")
    card = ModelCard.load(tmp_path / "mine" / "README.md")
    assert "More Information Needed" not in card.text  # not huggingface_hub's generic card
    assert card.data.library_name == "fcn-zoo" and card.data.datasets == ["me/streets"]
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type, result.dataset_split) == ("mean_iou", 61.23, "me/streets", "test")
    assert "fcn_zoo.from_pretrained(" in card.text and '"from_pretrained"' in card.text and "fcn-zoo predict " in card.text
    assert "| 1 | road, street |" in card.text and "`resnet18d` (timm), output stride 8" in card.text
    with pytest.raises(ValueError, match="eval_dataset"):  # an mIoU must say what it was measured on
        model.save_pretrained(tmp_path / "vague", mean_iou=50.0)
    assert not (tmp_path / "vague").exists()


def test_push_to_hub_uploads_the_same_card_naming_the_repo(monkeypatch):
    import huggingface_hub.hub_mixin as hub_mixin

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_text() for p in __import__("pathlib").Path(folder_path).iterdir() if p.suffix in (".md", ".json")})
            return "https://hub/commit/1"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    tiny_fcn(num_classes=19, dataset="cityscapes").push_to_hub("me/my-fcn", mean_iou=70.5)
    card = ModelCard(uploaded["README.md"])
    assert 'fcn_zoo.from_pretrained("me/my-fcn")' in card.text and "fcn-zoo predict me/my-fcn " in card.text
    assert card.data.eval_results[0].metric_value == 70.5 and card.data.eval_results[0].dataset_type == "cityscapes"
    assert json.loads(uploaded["config.json"])["class_names"][0] == "road"



def test_a_row_recipe_on_another_backbone_claims_none_of_the_rows_figures():
    from fcn_zoo.cards import model_card

    row = fcn_zoo.CHECKPOINTS["fcn_resnet50os8_voc"]
    config = {**row.model_config(), **row.data.metadata(), "backbone": "resnet18"}
    card = str(model_card(config, row=row, mean_iou=12.0))
    assert "reference, seed table" not in card and "66.86" not in card and "12.00" in card
    mine = str(model_card(tiny_fcn(num_classes=4, dataset=None).hub_config(), mean_iou=55.5, eval_dataset="me/data"))
    assert "OWNER/REPO" not in mine.split("---")[1]  # the model-index names no placeholder


def test_a_local_file_of_a_rows_name_claims_the_rows_figures_only_when_it_is_the_rows_known_file(monkeypatch):
    import dataclasses

    from fcn_zoo import zoo
    from fcn_zoo.cards import model_card
    from fcn_zoo.hub import cache_root

    row = fcn_zoo.CHECKPOINTS["fcn_resnet50os16_voc"]
    config = {**row.model_config(), **row.data.metadata()}
    local = {"source_file": "/data/fine-tuned/fcn_resnet50os16_voc.pth", "source_sha256": "a" * 64}
    card = model_card(config, row=row, provenance=local)
    assert "- Converted from fcn_resnet50os16_voc.pth" in card.text and row.reference_url not in card.text
    assert "## Results" not in card.text and "## Training" not in card.text and card.data.eval_results is None
    assert "published as" not in card.text and "none of that row's figures are claimed" in card.text

    cache_root().mkdir(parents=True)
    (cache_root() / "known_hashes.json").write_text(json.dumps({row.name: "a" * 64}))  # recorded at a download
    assert model_card(config, row=row, provenance=local).data.eval_results[0].metric_value == row.reference_miou
    (cache_root() / "known_hashes.json").unlink()
    monkeypatch.setitem(zoo.CHECKPOINTS, row.name, dataclasses.replace(row, sha256="a" * 64))  # published in the table
    card = model_card(config, row=zoo.CHECKPOINTS[row.name], provenance=local)
    assert "66.58 (reference, seed table)" in card.text and "- Converted from fcn_resnet50os16_voc.pth" in card.text


def test_a_row_converted_at_another_output_stride_is_titled_from_its_config():
    from fcn_zoo.cards import model_card

    row = fcn_zoo.CHECKPOINTS["fcn_resnet50os16_voc"]
    card = model_card({**row.model_config(), **row.data.metadata(), "output_stride": 8}, row=row)
    assert "\n# FCN R-50 OS8 PASCAL VOC 2012, from `fcn_resnet50os16_voc`\n" in card.text
    assert "66.58" not in card.text and card.data.eval_results is None
