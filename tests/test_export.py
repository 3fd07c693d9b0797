"""fcn-zoo export: ONNX checked with onnxruntime; dynamic batch and size."""

from __future__ import annotations

import json
import logging
import os
import shutil

import onnxruntime
import pytest
import torch

import fcn_zoo
from fcn_zoo.cli import main


def test_cli_export_writes_one_self_contained_file_quietly(tiny_folder, tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)  # as under the CLI: the exporter's INFO records would be shown
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    levels = {name: logging.getLogger(name).level for name in ("torch.onnx", "onnxscript", "onnx_ir")}
    assert main(["export", str(tiny_folder), "--format", "onnx", "--out", str(out)]) == 0
    assert {name: logging.getLogger(name).level for name in levels} == levels  # quiet only during the export
    printed = capfd.readouterr()
    assert len(printed.out.splitlines()) == 1 and "max abs logit difference" in printed.out
    assert printed.err == ""
    assert [r.getMessage() for r in caplog.records if not r.name.startswith("fcn_zoo")] == []
    assert sorted(os.listdir(out.parent)) == ["model.onnx"]  # no hidden weights file, no partial
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copied = shutil.copy(out, elsewhere / "copied.onnx")
    model = fcn_zoo.from_pretrained(tiny_folder)
    session = onnxruntime.InferenceSession(str(copied), providers=["CPUExecutionProvider"])
    # the file describes itself: named axes, and what a caller needs to prepare images and read the logits
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert session.get_outputs()[0].shape == ["batch", 21, "height", "width"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == model.class_names and json.loads(meta["palette"])[1] == list(model.palette[1])
    assert json.loads(meta["mean"]) == list(model.mean) and json.loads(meta["std"]) == list(model.std)
    assert json.loads(meta["eval_size"]) == list(model.eval_size) and meta["num_classes"] == "21"
    assert meta["source"] == str(tiny_folder) and meta["output"] == "logits"
    from fcn_zoo.weights import state_dict_sha256

    assert meta["state_dict_sha256"] == state_dict_sha256(model) and meta["fcn_zoo_version"] == fcn_zoo.__version__
    for shape in [(1, 3, 96, 128), (2, 3, 77, 131)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-4


def test_a_fused_model_exports_as_plain_onnx_operators(tiny_folder, tmp_path):
    import onnx

    from fcn_zoo.export import export

    model = fcn_zoo.from_pretrained(tiny_folder)
    path = export(fcn_zoo.from_pretrained(tiny_folder).fuse(), tmp_path / "fused.onnx")
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"Conv", "Relu", "Add"}  # not oneDNN calls
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        expected = model(x)
    assert (torch.from_numpy(session.run(None, {"image": x.numpy()})[0]) - expected).abs().max() < 1e-4


def test_export_refuses_a_folder_and_an_unknown_format(tiny_folder, tmp_path, capsys):
    assert main(["export", str(tiny_folder), "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "kept.onnx").write_text("mine")
    assert main(["export", str(tiny_folder), "--out", str(tmp_path / "kept.onnx")]) == 1
    assert "kept.onnx: already exists" in capsys.readouterr().err and (tmp_path / "kept.onnx").read_text() == "mine"
    from fcn_zoo.export import export

    with pytest.raises(ValueError, match="format"):
        export(fcn_zoo.from_pretrained(tiny_folder), tmp_path / "m.tflite", "tflite")


def test_predict_with_onnxruntime_gives_the_same_labels_and_exports_once(tiny_folder, monkeypatch):
    import fcn_zoo.export as export_module
    from conftest import PHOTOS

    calls = []
    real_export = export_module.export
    monkeypatch.setattr(export_module, "export", lambda *a, **k: calls.append(a[1]) or real_export(*a, **k))
    model = fcn_zoo.from_pretrained(tiny_folder)
    model.eval_size = (400, 200)  # windows of 160 over 200 x 267, not 512 x 683
    for mode in ("whole", "slide"):
        expected = model.predict(PHOTOS[0], mode=mode, window=(160, 160)).labels
        got = model.predict(PHOTOS[0], mode=mode, window=(160, 160), engine="onnxruntime").labels
        assert (got == expected).mean() > 0.999, mode
    again = fcn_zoo.from_pretrained(tiny_folder)  # same weights: the cached graph is reused
    again.predict(PHOTOS[1], engine="onnxruntime")
    assert len(calls) == 1 and calls[0].is_file()

    class Asked(Exception):
        pass

    def refuse(*args, **kwargs):  # the export itself is the one above; asking for it is what is checked
        calls.append(args[1])
        raise Asked

    monkeypatch.setattr(export_module, "export", refuse)
    with torch.no_grad():
        again.decode_head.classifier.bias.add_(1.0)  # new weights: a new graph
    with pytest.raises(Asked):
        again.predict(PHOTOS[1], engine="onnxruntime")
    assert len(calls) == 2 and calls[1] != calls[0]
    # the session kept on the model is keyed on the weights' content: writes torch cannot see count too
    model.predict(PHOTOS[1], engine="onnxruntime")  # the session of the first graph, kept on the model
    for edit in (lambda m: m.decode_head.classifier.bias.data.add_(3.0),  # not +1: that graph is cached (again's)
                 lambda m: m.decode_head.classifier.weight.detach().numpy().__imul__(0.5),
                 lambda m: setattr(m.decode_head[1], "eps", 0.5)):
        edit(model)
        with pytest.raises(Asked):
            model.predict(PHOTOS[1], engine="onnxruntime")
    assert len(calls) == 5 and len(set(calls)) == 5
    elsewhere = calls[0].parents[2] / "elsewhere"
    with pytest.raises(Asked):  # cache_dir= is where the graph goes
        model.predict(PHOTOS[1], engine="onnxruntime", cache_dir=elsewhere)
    assert calls[-1].parent == elsewhere / "onnx"

    with pytest.raises(ValueError, match="engine"):
        model.predict(PHOTOS[0], engine="tensorrt")


def test_a_damaged_onnxruntime_cache_entry_is_exported_again(tiny_folder, caplog, monkeypatch):
    import onnx

    from conftest import PHOTOS
    from fcn_zoo.hub import cache_root

    caplog.set_level(logging.INFO, logger="fcn_zoo")
    expected = fcn_zoo.from_pretrained(tiny_folder).predict(PHOTOS[0], engine="onnxruntime").labels
    folder = cache_root() / "onnx"
    (entry,) = folder.glob("*.onnx")

    def cut_short():
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])

    def weights_beside_and_gone():  # as entries were written before: weights in a hidden file beside
        data = f".{entry.name}.123.partial.data"
        onnx.save_model(onnx.load(str(entry)), str(entry), save_as_external_data=True, location=data, size_threshold=0)
        (folder / data).unlink()

    damage_checks = [(cut_short, True), (weights_beside_and_gone, False)]
    for damage, export_for_real in damage_checks:  # the second only checks that the export is asked for again
        damage()
        caplog.clear()
        if not export_for_real:
            import fcn_zoo.export as export_module

            class Asked(Exception):
                pass

            monkeypatch.setattr(export_module, "export", lambda *a, **k: (_ for _ in ()).throw(Asked()))
            with pytest.raises(Asked):
                fcn_zoo.from_pretrained(tiny_folder).predict(PHOTOS[0], engine="onnxruntime")
            rebuilt = [r for r in caplog.records if r.name == "fcn_zoo.export" and r.levelno == logging.INFO]
            assert len(rebuilt) == 1 and "exporting it again" in rebuilt[0].getMessage()
            continue
        got = fcn_zoo.from_pretrained(tiny_folder).predict(PHOTOS[0], engine="onnxruntime").labels  # no session kept
        assert (got == expected).all(), damage.__name__
        rebuilt = [r for r in caplog.records if r.name == "fcn_zoo.export" and r.levelno == logging.INFO]
        assert len(rebuilt) == 1 and "exporting it again" in rebuilt[0].getMessage(), damage.__name__
        assert sorted(os.listdir(folder)) == [entry.name]
        onnxruntime.InferenceSession(str(entry), providers=["CPUExecutionProvider"])


def test_two_threads_on_a_cold_cache_share_one_export(tiny_folder, monkeypatch):
    """An eval model may be shared by threads: the first onnxruntime predict of two at once exports once."""
    import threading

    import fcn_zoo.export as export_module
    from conftest import PHOTOS

    calls = []
    real_export = export_module.export
    monkeypatch.setattr(export_module, "export", lambda *a, **k: calls.append(a[1]) or real_export(*a, **k))
    model = fcn_zoo.from_pretrained(tiny_folder)
    model.eval_size = (128, 96)
    expected = model.predict(PHOTOS[0]).labels
    results = {}

    def run(i):
        try:
            results[i] = model.predict(PHOTOS[0], engine="onnxruntime").labels
        except Exception as e:  # noqa: BLE001 - what the thread met is the result
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert all((r == expected).mean() > 0.999 for r in results.values())
    assert len(calls) == 1


def test_export_to_a_folder_is_refused_before_exporting(tmp_path):
    from conftest import tiny_fcn
    from fcn_zoo.export import export

    (tmp_path / "out").mkdir()
    with pytest.raises(fcn_zoo.FCNZooError, match="is a folder; pass a file name"):
        export(tiny_fcn(), tmp_path / "out")
