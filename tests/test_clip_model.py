"""CLIP against OpenAI's reference outputs, architecture inference, and loading errors."""
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model import CLIPConfig, build_model, load

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_FILE = FIXTURES / "tiny_clip_openai_jit.pt"


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "tiny_clip_expected.pt")


def assert_close_relative(actual, reference, rtol=1e-5):
    error = (actual - reference).abs().max() / reference.abs().max()
    assert error < rtol, f"relative error {error:.2e}"


def check_against_reference(model, expected):
    with torch.no_grad():
        assert_close_relative(model.encode_image(expected["images"]), expected["image_features"])
        assert_close_relative(model.encode_text(expected["text"]), expected["text_features"])
        logits_per_image, logits_per_text = model(expected["images"], expected["text"])
    assert_close_relative(logits_per_image, expected["logits_per_image"])
    assert_close_relative(logits_per_text, expected["logits_per_text"])


def test_release_file_matches_openai_reference(expected):
    model = load(RELEASE_FILE)
    assert not model.training and model.dtype == torch.float32
    config = expected["config"]
    assert model.config == CLIPConfig(**config)
    check_against_reference(model, expected)


def test_plain_state_dict_matches_openai_reference(expected, tmp_path):
    state_dict = clip_model.read_state_dict(RELEASE_FILE)
    path = tmp_path / "tiny.pt"
    torch.save(state_dict, path)
    check_against_reference(load(path), expected)


def test_parameter_names_are_openai_keys():
    state_dict = clip_model.read_state_dict(RELEASE_FILE)
    model = load(RELEASE_FILE)
    released = set(state_dict) - {"input_resolution", "context_length", "vocab_size"}
    assert set(model.state_dict()) == released


def vit_b32_state_dict():
    return clip_model.CLIP(CLIPConfig()).state_dict()


def test_vit_b32_shape_builds_and_encodes():
    model = build_model(vit_b32_state_dict())
    assert model.config == CLIPConfig()  # every size inferred back from the tensors
    assert model.visual.transformer.resblocks[0].attn.heads == 12
    with torch.no_grad():
        features = model.encode_image(torch.randn(2, 3, 224, 224))
        text = model.encode_text(torch.tensor([[49406, 320, 49407] + [0] * 74]))
    assert features.shape == (2, 512) and text.shape == (1, 512)
    assert torch.isfinite(features).all()


def test_text_is_causal_and_read_at_eot():
    model = load(RELEASE_FILE)
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :4] = torch.tensor([998, 5, 6, 999])
    changed_after_eot = tokens.clone()
    changed_after_eot[0, 10] = 7  # a token after [EOT] must not reach the read-out through the causal mask
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), model.encode_text(changed_after_eot))
        changed_before = tokens.clone()
        changed_before[0, 1] = 8
        assert not torch.allclose(model.encode_text(tokens), model.encode_text(changed_before))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load(tmp_path / "nope.pt")


def test_file_of_neither_format(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="neither an OpenAI CLIP release file"):
        load(path)


def test_pickled_non_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        load(path)


def test_missing_and_unexpected_keys_are_listed():
    state_dict = load(RELEASE_FILE).state_dict()
    del state_dict["visual.ln_post.bias"]
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        build_model(state_dict)
    assert "missing keys: visual.ln_post.bias" in str(error.value)
    assert "unexpected keys: visual.extra_head.weight" in str(error.value)


def test_resnet_state_dict_is_refused():
    state_dict = vit_b32_state_dict()
    state_dict["visual.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match="only ViT backbones are supported"):
        build_model(state_dict)


def test_unknown_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(clip_model.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=r"--clip .*ViT-B-32\.pt"):
        load("ViT-B/32", download_root=tmp_path)


def test_named_model_is_checked_against_its_sha256(tmp_path, monkeypatch):
    """A cached file whose digest matches is used; one that does not is fetched again."""
    state_dict = clip_model.read_state_dict(RELEASE_FILE)
    payload_path = tmp_path / "payload.pt"
    torch.save(state_dict, payload_path)
    payload = payload_path.read_bytes()
    digest = clip_model._sha256(payload_path)
    monkeypatch.setitem(clip_model.OPENAI_MODELS, "tiny", f"https://example.invalid/{digest}/tiny.pt")

    class Response:
        def __init__(self):
            self.data = payload

        def read(self, n):
            chunk, self.data = self.data[:n], self.data[n:]
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    calls = []
    monkeypatch.setattr(clip_model.urllib.request, "urlopen", lambda *a, **k: calls.append(a) or Response())
    cache = tmp_path / "cache"
    assert load("tiny", download_root=cache).config.vision_layers == 3
    assert load("tiny", download_root=cache).config.vision_layers == 3
    assert len(calls) == 1  # the second load found the verified file in the cache

    (cache / "tiny.pt").write_bytes(b"corrupted")
    monkeypatch.setitem(clip_model.OPENAI_MODELS, "tiny", f"https://example.invalid/{'0' * 64}/tiny.pt")
    with pytest.raises(RuntimeError, match="SHA-256 does not match"):
        load("tiny", download_root=cache)
