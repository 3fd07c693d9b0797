"""Model cards: generated from the table, parseable by huggingface_hub, committed copies up to date."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import fcn_zoo
from fcn_zoo.cards import model_card, write_cards

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
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("mean_iou", row.miou)
    assert (result.dataset_type, result.dataset_split) == (row.data.hub_dataset, "val")
    assert all(c in card.text for c in row.data.classes)
    assert row.reference_url in card.text and f'from_pretrained("{name}")' in card.text


def test_provenance_and_measured_miou_appear_when_known():
    row = fcn_zoo.CHECKPOINTS["fcn_resnet50os8_cityscapes"]
    card = model_card(
        row,
        provenance={"source_sha256": "a" * 64, "weights_sha256": "b" * 64,
                    "parity": {"max_abs_diff": 3.2e-6, "label_agreement": 0.99991}},
        measured_miou=75.02,
    )
    text = str(card)
    assert "a" * 64 in text and "b" * 64 in text and "3.20e-06" in text and "0.9999" in text
    assert "75.02 (measured" in text
    assert card.data.eval_results[0].metric_value == 75.02
