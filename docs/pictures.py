"""Make the pictures of the documentation that come from running fcn-zoo: the training curves of a short
fine-tuning run, and the demo page segmenting one of that run's images in Chromium.

    python docs/pictures.py        # writes docs/images/training-curves.png and docs/images/demo-page.png

A small FCN (timm's resnet10t) is fine-tuned for 60 iterations on a generated three-class dataset (boxes and
ellipses on noise, the one the tests use), about 30 s on a 2-core CPU; the demo then serves its best/
folder. Needs the test extra and Debian's chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    from sample_data import make_generic

    import fcn_zoo
    from training import train

    IMAGES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_generic(work / "data", n_train=40, n_val=0, val=False, nested=True)
        torch.manual_seed(0)
        fcn_zoo.FCN(num_classes=21, backbone="resnet10t", head_channels=128, aux_channels=128, dataset="voc").save_pretrained(work / "src")
        run = work / "run"
        train.main(["--init", str(work / "src"), "--data-root", str(data), "--output-dir", str(run), "--val-fraction", "0.2",
                    "--max-iters", "60", "--batch-size", "8", "--lr", "0.05", "--eval-interval", "10", "--log-interval", "2",
                    "--device", "cpu", "--num-workers", "0", "--no-progress"])
        shutil.copy(run / "curves.png", IMAGES / "training-curves.png")
        photo = next(iter(sorted((data / "images" / "train").rglob("*.jpg"))))
        big = work / "photo.png"
        from PIL import Image

        Image.open(photo).resize((320, 256), Image.NEAREST).save(big)
        shutil.copytree(run / "best", work / "my-shapes-fcn")
        os.chdir(work)  # the page names the model as it is given: a folder beside, not a temporary path
        screenshot(Path("my-shapes-fcn"), big, IMAGES / "demo-page.png")
        os.chdir(ROOT)
    print(f"wrote {IMAGES / 'training-curves.png'} and {IMAGES / 'demo-page.png'}")


def screenshot(model_folder: Path, photo: Path, out: Path) -> None:
    """The demo serving ``model_folder``, ``photo`` uploaded and segmented, the page captured."""
    from playwright.sync_api import sync_playwright

    from fcn_zoo.demo import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app([str(model_folder)], device="cpu")
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            try:
                tab = browser.new_page(viewport={"width": 1280, "height": 900})
                tab.goto(f"http://127.0.0.1:{port}/")
                tab.locator("input[type=file]").first.set_input_files(str(photo))
                tab.wait_for_timeout(500)
                tab.locator("#segment").click()
                tab.locator("#overlay img").wait_for(state="visible", timeout=60_000)
                tab.wait_for_function("() => { const i = document.querySelector('#overlay img'); return i && i.complete && i.naturalWidth > 0 }")
                tab.wait_for_timeout(500)
                tab.screenshot(path=str(out), full_page=True)
            finally:
                browser.close()
    finally:
        app.close()


if __name__ == "__main__":
    main()
