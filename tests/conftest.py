"""Shared fixtures: the tiny CLIP in OpenAI's release format, and a randomly initialised ViT-B/32-shaped CLIP."""
import copy
from pathlib import Path

import pytest
import torch

from clip_model import CLIP, CLIPConfig, load

FIXTURES = Path(__file__).parent / "fixtures"

# The tests that document the method (README: `python -m pytest -m method`, under a minute on 2 cores): these
# files whole, less their slow tests, and the tests marked `method` in test_evaluate.py (the ranking) and
# test_data.py (frame sampling, CLIP's preprocessing).
METHOD_FILES = ("test_vop.py", "test_clip_model.py", "test_tokenizer.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in METHOD_FILES and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.method)


@pytest.fixture(scope="session")
def _tiny_clip():
    return load(FIXTURES / "tiny_clip_openai_jit.pt")


@pytest.fixture
def tiny_clip(_tiny_clip):
    """A fresh copy per test: VoP sets requires_grad flags on the CLIP it wraps."""
    return copy.deepcopy(_tiny_clip)


@pytest.fixture(scope="session")
def vit_b32_clip():
    torch.manual_seed(0)
    return CLIP(CLIPConfig()).eval()  # ViT-B/32's shapes with random weights; nothing to download


@pytest.fixture(scope="session")
def small_setup(tmp_path_factory):
    """(path of a small CLIP's state dict, a small synthetic world): see helpers.SMALL_CLIP and SMALL_WORLD."""
    import demo
    from helpers import SMALL_CLIP, SMALL_WORLD
    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    clip_path = root / "small_clip.pt"
    torch.save(CLIP(SMALL_CLIP).state_dict(), clip_path)
    return clip_path, demo.make_synthetic_world(root / "world", **SMALL_WORLD)
