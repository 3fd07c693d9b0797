"""A demo page: pick a model, drop a photo, see the mask (Gradio, the ``demo`` extra).

    fcn-zoo demo fcn_resnet50os16_voc              # http://127.0.0.1:7860
    python app.py                                   # what a Hugging Face Space runs

The page's one API endpoint, ``/segment``, is callable with ``gradio_client``::

    from gradio_client import Client, handle_file

    client = Client("http://127.0.0.1:7860/")
    overlay, mask, legend, confidence, timing = client.predict(
        handle_file("photo.jpg"), "fcn_resnet50os16_voc", False, False, "fp32", 0.5, api_name="/segment")

``overlay``, ``mask`` (the palette colours) and ``confidence`` (the top class's probability x 255) are
paths of PNG files, ``legend`` HTML and ``timing`` text. Models stay loaded between requests (the
``max_models`` most recently used); requests run one at a time, in a queue.
"""

from __future__ import annotations

import html
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from . import zoo
from ._inference import device_of
from .errors import FCNZooError, first_line
from .images import displayed_size

__all__ = ["build_app", "launch", "model_choices", "ModelCache"]

MAX_PIXELS = 50_000_000  # larger photos are refused with a message: resize them first
EXAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data"  # the repository's test photos, in a checkout


class ModelCache:
    """The ``capacity`` most recently used models, loaded once each (and fused: the page owns them and never
    changes their weights); loading is serialised."""

    def __init__(self, device: str | None = None, capacity: int = 2, loader=None):
        from .devices import check_device_available, check_device_options
        from .hub import from_pretrained

        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise FCNZooError(f"--max-models {capacity}: must be at least 1 (the models kept loaded at once)")
        if loader is None:  # a device that is not here is one line now, not an error on every request of the page
            check_device_options(device, "fp32", "torch")
            check_device_available(device or "cpu", f"--device {device}")
        self.capacity = capacity
        self.loader = loader or (lambda name: from_pretrained(name, device=device).fuse())
        self._models: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str):
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            model = self.loader(name)
            self._models[name] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model

    def __contains__(self, name: str) -> bool:
        return name in self._models


def model_choices(names: list[str] | None = None) -> list[tuple[str, str]]:
    """``(label, name)`` for the dropdown: dataset, classes and reference mIoU in the label, cached first."""
    from .hub import is_cached

    names = list(names or zoo.CHECKPOINTS)
    choices = []
    for name in names:
        row = zoo.CHECKPOINTS.get(name)
        cached = row is not None and is_cached(name)
        if row is not None:
            label = f"{name} · {row.data.title}, {row.num_classes} classes, mIoU {row.reference_miou:.1f}" + ("" if cached else " (downloads on first use)")
        else:
            label = name
        choices.append((not cached and row is not None, label, name))
    return [(label, name) for _, label, name in sorted(choices, key=lambda c: c[0])]


def segment(models: ModelCache, image_path, name: str, tta: bool, slide: bool, precision: str, opacity: float):
    """The page's one action; every failure is a message on the page (``gr.Error``), never a traceback."""
    import gradio as gr
    from PIL import Image

    if not image_path:
        raise gr.Error("Upload a photo first (or pick one of the examples).")
    if not name:
        raise gr.Error("Pick a model first.")
    shown = Path(image_path).name
    try:
        with Image.open(image_path) as probe:
            if probe.width * probe.height > MAX_PIXELS:  # from the header, before anything is decoded (a TIFF would be)
                raise gr.Error(f"The photo is {probe.width}x{probe.height} ({probe.width * probe.height / 1e6:.0f} MP); "
                               f"the demo takes up to {MAX_PIXELS / 1e6:.0f} MP: resize it first.")
            width, height = displayed_size(probe)
    except Image.DecompressionBombError:
        raise gr.Error(f"{shown} is too large to decode safely; the demo takes photos up to {MAX_PIXELS / 1e6:.0f} MP: resize it first.") from None
    except gr.Error:
        raise
    except Exception as e:  # the server's temporary path is not the user's to see
        raise gr.Error(f"{shown} is not an image ({first_line(e).replace(str(image_path), shown)}): upload a JPEG, PNG "
                       "or WebP photo.") from None
    if width * height > MAX_PIXELS:
        raise gr.Error(f"The photo is {width}x{height} ({width * height / 1e6:.0f} MP); the demo takes up to {MAX_PIXELS / 1e6:.0f} MP: resize it first.")
    try:
        model = models.get(name)
    except Exception as e:
        raise gr.Error(f"{name} could not be loaded: {first_line(e)}") from None
    start = time.perf_counter()
    try:
        seg = model.predict(image_path, tta=tta, mode="slide" if slide else "whole", precision=precision)
    except (FCNZooError, OSError, ValueError, RuntimeError) as e:
        message = first_line(e)  # the upload's temporary path, where it names it, as the photo's name
        raise gr.Error(message.replace(str(image_path), shown) if str(image_path) in message else f"{shown}: {message}") from None
    seconds = time.perf_counter() - start
    confidence = Image.fromarray(np.round(seg.confidence * 255).astype(np.uint8))
    height, width = seg.size  # as segmented: the photo as displayed
    timing = f"{seconds:.2f} s on {device_of(model)}, {width}x{height}"
    timing += (", TTA" if tta else "") + (", sliding windows" if slide else "")
    return seg.overlay(alpha=opacity), seg.colorize(), legend(seg), confidence, timing, seg


def reblend(seg, opacity: float):
    """The overlay at another opacity, without running the model again."""
    return None if seg is None else seg.overlay(alpha=opacity)


def legend(seg) -> str:
    """The classes present, largest first, with their colours and pixel shares."""
    rows = []
    for name, share in sorted(seg.class_shares().items(), key=lambda kv: -kv[1]):
        r, g, b = seg.palette[seg.class_names.index(name)]
        rows.append(
            f'<li><span style="display:inline-block;width:1em;height:1em;background:rgb({r},{g},{b});'
            f'border:1px solid #888;vertical-align:middle"></span> {html.escape(name)}: {100 * share:.1f}%</li>'
        )
    return '<ul class="fcn-legend" style="list-style:none;padding-left:0">' + "".join(rows) + "</ul>"


def precisions(device: str | None) -> list[str]:
    """What the device runs fast: fp32 everywhere, bf16 and fp16 on GPUs, bf16 on CPUs with bf16 instructions
    (elsewhere it is emulated and slower than fp32). The page offers "auto" first, its default: bf16 where the
    device runs it natively, else fp32 (an int8 model: OpenVINO's choice)."""
    from ._fusion import cpu_has_bf16

    if (device or "cpu").startswith("cuda"):
        return ["fp32", "bf16", "fp16"]
    return ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]


def _readable_uploads(photo, gr):
    """``photo`` (a ``gr.Image``) with unreadable uploads (not an image, a decompression bomb) turned into a
    message on the page. Its ``preprocess`` is wrapped on the instance: a subclass of a Gradio component
    would make Gradio write a ``.pyi`` stub beside this module."""
    preprocess = photo.preprocess

    def guarded(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:
            shown = Path(getattr(payload, "orig_name", None) or getattr(payload, "path", None) or "the upload").name
            raise gr.Error(f"{shown} is not an image the demo can read ({first_line(e)}): upload a JPEG, PNG or WebP "
                           f"photo of at most {MAX_PIXELS / 1e6:.0f} MP.") from None

    photo.preprocess = guarded
    return photo


def build_app(names: list[str] | None = None, *, device: str | None = None, max_models: int = 2, models: ModelCache | None = None):
    """The Gradio ``Blocks`` of the demo page for ``names`` (default: the twelve rows); ``models``: a
    :class:`ModelCache` to share (default a new one for ``device``, holding ``max_models``)."""
    import gradio as gr

    models = models or ModelCache(device, max_models)
    choices = model_choices(names)
    examples = sorted(str(p) for p in EXAMPLES.glob("*.jpg")) if EXAMPLES.is_dir() else []
    with gr.Blocks(title="fcn-zoo: FCN semantic segmentation") as app:
        gr.Markdown(
            "# fcn-zoo\nFCN semantic segmentation: pick a model, drop a photo (or paste one, or use the webcam), press "
            "**Segment**. [The twelve models](https://github.com/fcn-zoo/fcn-zoo)."
        )
        state = gr.State()
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(choices, value=choices[0][1], label="model")
                photo = _readable_uploads(gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"], label="photo"), gr)
                with gr.Row():
                    tta = gr.Checkbox(label="TTA (flip + 6 scales)")
                    slide = gr.Checkbox(label="sliding windows")
                    precision = gr.Dropdown(["auto", *precisions(device)], value="auto", label="precision")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                if examples:
                    gr.Examples(examples, inputs=photo)
            with gr.Column():
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="mask opacity")
                overlay = gr.Image(label="overlay", format="png", elem_id="overlay")
                legend_box = gr.HTML(label="classes")
                timing = gr.Markdown(elem_id="timing")
                with gr.Row():
                    mask = gr.Image(label="mask", format="png")
                    confidence = gr.Image(label="confidence (top class probability)", format="png")
        def run(photo_path, name, tta, slide, precision, opacity, progress=gr.Progress(track_tqdm=True)):
            if name and name not in models:  # the download's progress bar shows on the page
                progress(0, desc=f"loading {name}")
            return segment(models, photo_path, name, tta, slide, precision, opacity)

        button.click(
            run, inputs=[photo, model, tta, slide, precision, opacity],
            outputs=[overlay, mask, legend_box, confidence, timing, state], api_name="segment",
        )
        opacity.release(reblend, inputs=[state, opacity], outputs=overlay, api_name=False)
    app.queue(default_concurrency_limit=1)  # one request at a time; the others wait their turn
    return app


def launch(names: list[str] | None = None, *, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
           share: bool = False, max_models: int = 2):
    """Build the page and serve it until interrupted."""
    app = build_app(names, device=device, max_models=max_models)
    app.launch(server_name=host, server_port=port, share=share, show_error=False)
