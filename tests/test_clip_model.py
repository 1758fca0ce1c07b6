"""CLIP against OpenAI's reference outputs, architecture inference, the activation and head settings, and what
`load` records. Reading the other formats, and refusing unsafe files, is tested in test_clip_weights.py."""
import json
from pathlib import Path

import pytest
import torch

import clip_model
from formats import clip_weights
from clip_model import CLIPConfig
from clip_model import build_model, load

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_FILE = FIXTURES / "tiny_clip_openai_jit.pt"


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "tiny_clip_expected.pt")


@pytest.fixture(scope="module")
def release_state_dict():
    return clip_weights.read_state_dict(RELEASE_FILE)


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
    assert model.config == CLIPConfig(**expected["config"])
    assert model.config.activation == "quick_gelu"
    check_against_reference(model, expected)


def test_plain_state_dict_matches_openai_reference(expected, release_state_dict, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(release_state_dict, path)
    check_against_reference(load(path), expected)
    torch.save({"epoch": 3, "state_dict": release_state_dict}, path)  # a training checkpoint's layout
    check_against_reference(load(path), expected)


def test_parameter_names_are_openai_keys(release_state_dict):
    model = load(RELEASE_FILE)
    released = set(release_state_dict) - {"input_resolution", "context_length", "vocab_size"}
    assert set(model.state_dict()) == released


def vit_b32_state_dict():
    return clip_model.CLIP(CLIPConfig()).state_dict()


def small_state_dict():
    return clip_model.CLIP(CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                                      vision_patch_size=16, vocab_size=100, transformer_width=64,
                                      transformer_heads=1, transformer_layers=1)).state_dict()


@pytest.mark.slow
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


def test_config_defaults_follow_openai_and_validate():
    config = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=16,
                        context_length=77, vocab_size=100, transformer_width=64, transformer_heads=1,
                        transformer_layers=2)
    assert (config.vision_heads, config.vision_mlp_width, config.transformer_mlp_width) == (2, 512, 256)
    assert config.activation == "quick_gelu"
    with pytest.raises(ValueError, match="vision_heads"):
        CLIPConfig(vision_width=768, vision_heads=5)
    with pytest.raises(ValueError, match="swish"):
        CLIPConfig(activation="swish")


def test_gelu_is_a_real_switch(release_state_dict, expected, tmp_path):
    """The same weights give other numbers under GELU, and a state dict file takes the activation from load."""
    quick, gelu = build_model(release_state_dict), build_model(release_state_dict, activation="gelu")
    assert isinstance(gelu.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    with torch.no_grad():
        assert not torch.allclose(quick.encode_image(expected["images"]), gelu.encode_image(expected["images"]))
        assert not torch.allclose(quick.encode_text(expected["text"]), gelu.encode_text(expected["text"]))
    path = tmp_path / "tiny.pt"
    torch.save(release_state_dict, path)
    loaded = load(path, activation="gelu")
    assert loaded.config.activation == loaded.source["activation"] == "gelu"
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(expected["images"]), gelu.encode_image(expected["images"]))


def test_head_counts_are_real(release_state_dict, expected):
    """Head counts the tensors cannot tell change the numbers, so they must come from a config."""
    default = build_model(release_state_dict)
    assert default.config.transformer_heads == 2  # width 128 // 64
    four_heads = build_model(release_state_dict, transformer_heads=4, vision_heads=4)
    assert four_heads.visual.transformer.resblocks[0].attn.heads == 4
    with torch.no_grad():
        assert not torch.allclose(default.encode_text(expected["text"]), four_heads.encode_text(expected["text"]))


def test_config_sizes_must_agree_with_the_tensors(release_state_dict):
    with pytest.raises(clip_weights.WeightsError, match="vision_width"):
        build_model(release_state_dict, vision_width=256)


def test_missing_and_unexpected_keys_are_listed():
    state_dict = load(RELEASE_FILE).state_dict()
    del state_dict["visual.ln_post.bias"]
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(clip_weights.WeightsError) as error:
        build_model(state_dict)
    assert "visual.ln_post.bias" in str(error.value) and "visual.extra_head.weight" in str(error.value)


def test_resnet_state_dict_is_refused(tmp_path):
    state_dict = small_state_dict()
    state_dict["visual.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state_dict, tmp_path / "RN50.pt")
    with pytest.raises(clip_weights.WeightsError, match=r"RN50\.pt.*ResNet"):
        load(tmp_path / "RN50.pt")


def test_image_tower_alone_is_refused():
    state_dict = {k: v for k, v in small_state_dict().items() if k.startswith("visual.")}
    with pytest.raises(clip_weights.WeightsError, match="text tower"):
        build_model(state_dict)


def test_source_is_plain_data_that_rebuilds_the_same_model(tmp_path, release_state_dict):
    path = tmp_path / "tiny.pt"
    torch.save(release_state_dict, path)
    for name, fmt in ((RELEASE_FILE, "openai-release"), (path, "state-dict")):
        model = load(name, activation="quick_gelu")
        source = json.loads(json.dumps(model.source))  # what a checkpoint stores
        assert source == model.source and all(isinstance(v, str) for v in source.values())
        assert source["format"] == fmt and source["path"] == str(Path(name).absolute())
        assert source["sha256"] == clip_weights.file_sha256(Path(name))
        again = load(source["clip"], activation=source["activation"], sha256=source["sha256"])
        pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_other_weights_than_recorded_are_refused(tmp_path):
    with pytest.raises(clip_weights.WeightsError, match=RELEASE_FILE.name):
        load(RELEASE_FILE, sha256="0" * 64)


def test_activation_contradicting_a_config_is_refused():
    with pytest.raises(clip_weights.WeightsError, match="open_clip_config.json"):
        load(FIXTURES / "tiny_clip_open_clip", activation="quick_gelu")  # its config says GELU
