import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fast_llama computes in bfloat16 on CPUs that have it; the suite compares against transformers exactly, so it pins
# float32 (the bfloat16 path has its own tests in test_fast_llama.py, which set the variable themselves)
os.environ["RETOUCH_FAST_DTYPE"] = "float32"

import pytest
import torch

from demo_core.backbone import BackboneConfig, build_backbone
from demo_core.sequence import Vocab

TINY_VOCAB = Vocab(codebook_size=16, cells=16)


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=256), TINY_VOCAB)
    return model.eval()
