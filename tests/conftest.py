"""Shared fixtures. Tests never touch the network: every cache is a temporary folder and the reference
URL points at a loopback port where nothing listens, unless a test serves files there itself."""

from __future__ import annotations

import contextlib
import functools
import http.server
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

import fcn_zoo

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """A fresh fcn_zoo cache and Hugging Face cache per test; no route to the internet."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("FCN_ZOO_CACHE", str(tmp_path / "fcn_zoo_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("FCN_ZOO_REFERENCE_URL", "http://127.0.0.1:9/nothing-listens-here")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    yield tmp_path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model


def tiny_fcn(num_classes: int = 21, dataset: str | None = "voc", seed: int = 0) -> fcn_zoo.FCN:
    """A small FCN (ResNet-18-D backbone, narrow heads) that runs in milliseconds on CPU."""
    torch.manual_seed(seed)
    model = fcn_zoo.FCN(
        num_classes=num_classes, backbone="resnet18d", output_stride=8, head_channels=32, aux_channels=16,
        dataset=dataset,
    )
    return randomize_batchnorm(model, seed).eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A save_pretrained folder of :func:`tiny_fcn`."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-fcn"
    tiny_fcn().save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_model(tiny_folder) -> fcn_zoo.FCN:
    return fcn_zoo.from_pretrained(tiny_folder)


@contextlib.contextmanager
def serve_folder(folder: Path):
    """Serve ``folder`` over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        QuietHandler.requests.append(self.path)
        super().do_GET()


def answering(status: int | None):
    """A loopback server answering every request with ``status``, or never answering (``None``)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            if status is None:
                time.sleep(5)
                return
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """A save_pretrained folder of the tiny FCN evaluated at 128x96 at most, so that each image or frame costs
    milliseconds; shared by the tests that only read it."""
    model = tiny_fcn()
    model.eval_size = (128, 96)
    folder = tmp_path_factory.mktemp("small") / "small-fcn"
    model.save_pretrained(folder)
    return folder
