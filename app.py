"""The fcn-zoo demo as a Hugging Face Space runs it: `python app.py` (Gradio, `pip install "fcn-zoo[demo]"`).

FCN_ZOO_DEMO_MODELS (space-separated names) limits the models offered; FCN_ZOO_DEMO_DEVICE picks the device
(default: cuda when the Space has a GPU, else cpu). See the documentation's demo page (docs/demo.md).
"""

import os

import torch

from fcn_zoo.demo import build_app

names = os.environ.get("FCN_ZOO_DEMO_MODELS", "").split() or None
device = os.environ.get("FCN_ZOO_DEMO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
demo = build_app(names, device=device)

if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
