"""Reading weights: every format against its reference outputs, the transformers renaming, the safetensors
reader, errors that name the file and what is missing, and files that must not run code."""
import json
import os
import pickle
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from formats import clip_weights
from clip_model import build_model, load
from vop import VoP, VoPConfig

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_FILE = FIXTURES / "tiny_clip_openai_jit.pt"
HF, HF_BIN, OPEN_CLIP = FIXTURES / "tiny_clip_hf", FIXTURES / "tiny_clip_hf_bin", FIXTURES / "tiny_clip_open_clip"

# (what to pass to load, the format, the reference outputs, the heads and activation the config gives)
FORMATS = {
    "transformers folder": (HF, "transformers", "tiny_clip_hf_expected.pt", 2, 2, "quick_gelu"),
    "transformers .safetensors": (HF / "model.safetensors", "transformers", "tiny_clip_hf_expected.pt", 2, 2,
                                  "quick_gelu"),
    "transformers .bin folder": (HF_BIN, "transformers", "tiny_clip_hf_expected.pt", 2, 2, "quick_gelu"),
    "transformers .bin": (HF_BIN / "pytorch_model.bin", "transformers", "tiny_clip_hf_expected.pt", 2, 2,
                          "quick_gelu"),
    # open_clip's vision heads come from its default head_width of 64: this 64-wide tower has 1.
    "open_clip folder": (OPEN_CLIP, "open_clip", "tiny_clip_open_clip_expected.pt", 1, 2, "gelu"),
    "open_clip .bin": (OPEN_CLIP / "open_clip_pytorch_model.bin", "open_clip", "tiny_clip_open_clip_expected.pt",
                       1, 2, "gelu"),
    "open_clip .safetensors": (OPEN_CLIP / "open_clip_model.safetensors", "open_clip",
                               "tiny_clip_open_clip_expected.pt", 1, 2, "gelu"),
}


def relative_error(actual, reference):
    return ((actual - reference).abs().max() / reference.abs().max()).item()


def assert_matches(model, expected):
    with torch.no_grad():
        assert relative_error(model.encode_image(expected["images"]), expected["image_features"]) < 1e-5
        # OpenAI's read-out: the text tower's output at argmax(tokens), the [EOT] with the largest id
        assert relative_error(model.encode_text(expected["text"]), expected["text_features"]) < 1e-5


@pytest.mark.parametrize("case", FORMATS)
def test_every_format_matches_its_reference(case):
    path, fmt, expected_file, vision_heads, text_heads, activation = FORMATS[case]
    model = load(path)
    assert model.source["format"] == fmt and model.source["activation"] == activation
    assert (model.config.vision_heads, model.config.transformer_heads) == (vision_heads, text_heads)
    assert model.dtype == torch.float32 and not model.training
    assert_matches(model, torch.load(FIXTURES / expected_file))


def test_transformers_without_mask_is_the_same_read_out():
    expected = torch.load(FIXTURES / "tiny_clip_hf_expected.pt")
    assert relative_error(expected["text_features_without_mask"], expected["text_features"]) < 1e-5


@pytest.mark.parametrize("path", [RELEASE_FILE, HF, HF_BIN, OPEN_CLIP], ids=lambda p: p.name)
def test_vop_runs_on_every_format(path):
    torch.manual_seed(0)
    model = VoP(load(path), VoPConfig(("pos",), num_frames=2))
    frames = torch.randn(2, 2, 3, 64, 64)  # (B, F, 3, R, R)
    tokens = torch.zeros(2, 20, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[0, 4], tokens[1, 6] = 998, 7, 999, 999
    with torch.no_grad():
        videos, texts = model.encode_video(frames), model.encode_text(tokens)
    assert videos.shape == texts.shape == (2, model.clip.config.embed_dim)
    assert torch.isfinite(videos).all() and torch.isfinite(texts).all()


def test_transformers_names_become_openai_names():
    hf = clip_weights.read_state_dict(HF / "model.safetensors")
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older transformers saved it
    renamed = clip_weights.transformers_to_openai(hf)
    reference = load(OPEN_CLIP).state_dict()  # the same architecture under OpenAI's names
    assert set(renamed) == set(reference)
    assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in reference.items()}
    layer = "vision_model.encoder.layers.1.self_attn."
    packed = torch.cat([hf[layer + f"{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(renamed["visual.transformer.resblocks.1.attn.in_proj_weight"], packed)
    assert torch.equal(renamed["visual.proj"], hf["visual_projection.weight"].t())
    assert torch.equal(renamed["text_projection"], hf["text_projection.weight"].t())
    assert torch.equal(renamed["visual.ln_pre.weight"], hf["vision_model.pre_layrnorm.weight"])


def test_openai_named_state_dict_takes_the_activation(tmp_path):
    """open_clip's GELU weights without their config: the tensors cannot tell the activation, the caller can."""
    state_dict = clip_weights.read_state_dict(OPEN_CLIP / "open_clip_pytorch_model.bin")
    path = tmp_path / "laion_style.pt"
    torch.save(state_dict, path)
    assert load(path).config.activation == "quick_gelu"  # OpenAI's default
    assert load(path, activation="gelu").source == {**load(path).source, "activation": "gelu"}
    exact = build_model(state_dict, activation="gelu", transformer_heads=2)  # what open_clip_config.json says
    assert_matches(exact, torch.load(FIXTURES / "tiny_clip_open_clip_expected.pt"))


def test_hugging_face_cache_folder(tmp_path):
    """~/.cache/huggingface/hub/models--org--name: refs/main names the snapshot, whose files are links."""
    repo = tmp_path / "models--someone--tiny-clip"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "snapshots" / "old456").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(HF / name, blobs / name)
        (snapshot / name).symlink_to(Path("../../blobs") / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model = load(repo)
    assert model.source["path"] == str(snapshot / "model.safetensors")
    assert_matches(model, torch.load(FIXTURES / "tiny_clip_hf_expected.pt"))
    (repo / "refs" / "main").unlink()
    with pytest.raises(FileNotFoundError, match="old456"):
        load(repo)


def write_safetensors(path, tensors, header=None):
    """A .safetensors file as the format defines it; `header` replaces the JSON header, for broken files."""
    entries, data, offset = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        entries[name] = {"dtype": {v: k for k, v in clip_weights.SAFETENSORS_DTYPES.items()}[tensor.dtype],
                         "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    header_bytes = json.dumps(header if header is not None else entries).encode()
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)


def test_safetensors_reader_reads_every_dtype(tmp_path):
    torch.manual_seed(0)
    tensors = {str(dtype): (torch.randn(3, 5) * 50).to(dtype) for dtype in clip_weights.SAFETENSORS_DTYPES.values()}
    tensors["scalar"], tensors["empty"] = torch.tensor(4.6052), torch.zeros(0, 4)
    write_safetensors(tmp_path / "all.safetensors", tensors)
    read = clip_weights.read_safetensors(tmp_path / "all.safetensors")
    assert set(read) == set(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)


@pytest.mark.parametrize("broken, named", [
    (lambda entry: {**entry, "data_offsets": [0, 10 ** 9]}, "weight"),  # past the end of the file
    (lambda entry: {**entry, "shape": [4, 4]}, "weight"),  # 16 floats do not fit 12 floats' bytes
    (lambda entry: {**entry, "dtype": "F8_E4M3"}, "weight"),
    (lambda entry: {**entry, "shape": [-3, 4]}, "weight"),
])
def test_safetensors_reader_validates_the_header(tmp_path, broken, named):
    tensor = torch.ones(3, 4)
    entry = {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    path = tmp_path / "broken.safetensors"
    write_safetensors(path, {"weight": tensor}, header={"weight": broken(entry)})
    with pytest.raises(clip_weights.WeightsError, match=named) as error:
        clip_weights.read_safetensors(path)
    assert "broken.safetensors" in str(error.value)


def test_safetensors_header_length_is_bounded(tmp_path):
    path = tmp_path / "long_header.safetensors"
    path.write_bytes((10 ** 6).to_bytes(8, "little") + b'{"a": 1}')
    with pytest.raises(clip_weights.WeightsError, match="long_header.safetensors"):
        clip_weights.read_safetensors(path)


@pytest.mark.parametrize("spans", [[(0, 400_000)] * 50, [(0, 400_000), (399_996, 799_996)]],
                         ids=["50 tensors on the same bytes", "two overlapping tensors"])
def test_safetensors_tensors_that_share_bytes_are_refused_before_any_copy(tmp_path, spans):
    header = {f"t{k}": {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}
              for k, (begin, end) in enumerate(spans)}
    path = tmp_path / "aliased.safetensors"
    header_bytes = json.dumps(header).encode()
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + bytes(800_000))
    tracemalloc.start()
    with pytest.raises(clip_weights.WeightsError, match=r"aliased.safetensors: tensors 't0' and 't1' share bytes"):
        clip_weights.read_safetensors(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 400_000  # not one tensor was copied


@pytest.mark.parametrize("header, named", [
    ({"w": {"dtype": "F32", "shape": [0, 2 ** 63], "data_offsets": [0, 0]}}, "shape"),
    ({"w": {"dtype": "F32", "shape": [0, 2 ** 62, 4], "data_offsets": [0, 0]}}, "shape"),
    ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, "shape"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
], ids=["2**63", "2**64 elements of nothing", "a boolean", "nested 100,000 deep"])
def test_safetensors_absurd_shapes_and_deep_headers_are_one_line_errors(tmp_path, header, named):
    header_bytes = (header if isinstance(header, str) else json.dumps(header)).encode()
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + bytes(16))
    with pytest.raises(clip_weights.WeightsError, match=named) as refused:
        clip_weights.read_safetensors(path)
    assert "absurd.safetensors" in str(refused.value) and "\n" not in str(refused.value)


def test_sharded_safetensors(tmp_path):
    tensors = clip_weights.read_state_dict(HF / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in halves.items():
        write_safetensors(tmp_path / shard, {n: tensors[n] for n in shard_names})
    weight_map = {n: shard for shard, shard_names in halves.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(HF / "config.json", tmp_path / "config.json")
    model = load(tmp_path)
    assert model.source["path"].endswith("model.safetensors.index.json")
    assert_matches(model, torch.load(FIXTURES / "tiny_clip_hf_expected.pt"))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load(tmp_path)


@pytest.mark.parametrize("text", ["{not json", '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_a_shard_index_that_is_not_json_is_named(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(clip_weights.WeightsError, match="model.safetensors.index.json"):
        clip_weights.shard_files(tmp_path / "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------
# Errors name the file and what is missing


def test_transformers_folder_without_config(tmp_path):
    shutil.copy(HF / "model.safetensors", tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)


def test_vision_model_without_text_tower(tmp_path):
    tensors = clip_weights.read_state_dict(HF / "model.safetensors")
    write_safetensors(tmp_path / "model.safetensors",
                      {k: v for k, v in tensors.items() if k.startswith(("vision_model.", "visual_projection"))})
    shutil.copy(HF / "config.json", tmp_path)
    with pytest.raises(clip_weights.WeightsError, match="text tower") as error:
        load(tmp_path)
    assert "model.safetensors" in str(error.value)


@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip"])
def test_transformers_config_of_another_model(tmp_path, model_type):
    shutil.copy(HF / "model.safetensors", tmp_path)
    config = json.loads((HF / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    with pytest.raises(clip_weights.WeightsError, match=model_type):
        load(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000])
def test_a_config_that_is_not_a_json_object_is_named(tmp_path, text):
    shutil.copy(HF / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(clip_weights.WeightsError, match="config.json"):
        load(tmp_path)


def test_transformers_unsupported_activation(tmp_path):
    shutil.copy(HF / "model.safetensors", tmp_path)
    config = json.loads((HF / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(clip_weights.WeightsError, match="hidden_act"):
        load(tmp_path)


def open_clip_copy(tmp_path, edit):
    shutil.copy(OPEN_CLIP / "open_clip_model.safetensors", tmp_path)
    config = json.loads((OPEN_CLIP / "open_clip_config.json").read_text())
    edit(config["model_cfg"])
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    return tmp_path


def test_open_clip_resnet_is_refused(tmp_path):
    folder = open_clip_copy(tmp_path, lambda cfg: cfg["vision_cfg"].update(layers=[3, 4, 6, 3]))
    with pytest.raises(clip_weights.WeightsError, match="ResNet"):
        load(folder)


def test_open_clip_setting_that_changes_the_computation_is_refused(tmp_path):
    folder = open_clip_copy(tmp_path, lambda cfg: cfg["text_cfg"].update(no_causal_mask=True))
    with pytest.raises(clip_weights.WeightsError, match="no_causal_mask"):
        load(folder)


def test_open_clip_heads_and_quick_gelu_come_from_the_config(tmp_path):
    def edit(cfg):
        cfg["vision_cfg"]["head_width"] = 32
        cfg["quick_gelu"] = True
    model = load(open_clip_copy(tmp_path, edit))
    assert (model.config.vision_heads, model.config.activation) == (2, "quick_gelu")


def test_open_clip_other_normalisation_is_warned_about(tmp_path):
    folder = open_clip_copy(tmp_path, lambda cfg: None)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="mean"):
        load(folder)


def test_open_clip_checkpoint_without_its_config(tmp_path):
    shutil.copy(OPEN_CLIP / "open_clip_pytorch_model.bin", tmp_path)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load(tmp_path / "open_clip_pytorch_model.bin")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").touch()
    with pytest.raises(clip_weights.WeightsError, match=r"empty\.pt.*empty"):
        load(tmp_path / "empty.pt")


def test_folder_without_weights_lists_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="model.safetensors") as error:
        load(tmp_path)
    assert str(tmp_path) in str(error.value) and "notes.txt" in str(error.value)


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load(tmp_path / "nope.pt")


def test_file_of_unknown_format(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(clip_weights.WeightsError, match="notes.pt"):
        load(path)


def test_pickled_non_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(clip_weights.WeightsError, match="list.pt"):
        load(path)


def test_truncated_release_file(tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(RELEASE_FILE.read_bytes()[:100_000])
    with pytest.raises(clip_weights.WeightsError, match="cut.pt"):
        load(path)


# ---------------------------------------------------------------------------------------------------------
# No file runs code


class RunsAShellCommand:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def release_with_data_pkl(path, data_pkl: bytes):
    """OpenAI's release file with its data.pkl replaced: a TorchScript archive in every other respect."""
    with zipfile.ZipFile(RELEASE_FILE) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            target.writestr(item, data_pkl if item.filename.endswith("/data.pkl") else source.read(item))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "torchscript data.pkl", "state_dict entry"])
def test_crafted_pickle_runs_nothing(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(RunsAShellCommand(), path)
    elif how == "pickle.dump":
        path.write_bytes(pickle.dumps(RunsAShellCommand(), protocol=2))
    elif how == "torchscript data.pkl":
        release_with_data_pkl(path, pickle.dumps(RunsAShellCommand(), protocol=2))
    else:
        torch.save({"state_dict": {"visual.proj": RunsAShellCommand()}}, path)
    with pytest.raises(clip_weights.WeightsError, match="evil.pt") as error:
        load(path)
    assert "system" in str(error.value)  # names what it refused
    assert not (tmp_path / "PWNED").exists()


def test_release_is_read_without_torch_jit(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")
    monkeypatch.setattr(torch.jit, "load", forbidden)
    assert set(load(RELEASE_FILE).state_dict())  # loads all the same


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load is deprecated
def test_release_reader_gives_what_torch_jit_gives():
    """The reference: torch.jit on our own fixture (trusted), compared tensor by tensor, dtype included."""
    ours, jit = clip_weights.read_state_dict(RELEASE_FILE), torch.jit.load(str(RELEASE_FILE)).state_dict()
    assert set(ours) == set(jit)
    assert all(ours[k].dtype == jit[k].dtype and torch.equal(ours[k], jit[k]) for k in jit)


class SharedStorage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        base = torch.arange(12.0)
        self.register_buffer("middle", base[3:7])  # a storage offset
        self.register_buffer("every_other", base.view(3, 4)[:, ::2])  # strides

    def forward(self, x):
        return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
def test_release_reader_keeps_offsets_and_strides(tmp_path):
    module = torch.jit.script(SharedStorage())
    torch.jit.save(module, tmp_path / "views.pt")
    read = clip_weights.read_state_dict(tmp_path / "views.pt")
    assert set(read) == {"middle", "every_other"}
    assert torch.equal(read["middle"], module.middle) and torch.equal(read["every_other"], module.every_other)


# ---------------------------------------------------------------------------------------------------------
# OpenAI's models by name


def test_unknown_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(clip_weights.urllib.request, "urlopen", offline)
    with pytest.raises(clip_weights.WeightsError, match=r"--clip .*ViT-B-32\.pt"):
        load("ViT-B/32", download_root=tmp_path)


def test_named_model_is_checked_against_its_sha256(tmp_path, monkeypatch):
    """A cached file whose digest matches is used; one that does not is fetched again."""
    payload = RELEASE_FILE.read_bytes()
    digest = clip_weights.file_sha256(RELEASE_FILE)
    monkeypatch.setitem(clip_weights.OPENAI_MODELS, "tiny", f"https://example.invalid/{digest}/tiny.pt")

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
    monkeypatch.setattr(clip_weights.urllib.request, "urlopen", lambda *a, **k: calls.append(a) or Response())
    cache = tmp_path / "cache"
    model = load("tiny", download_root=cache)
    assert model.config.vision_layers == 3
    assert model.source["clip"] == "tiny" and model.source["sha256"] == digest
    assert model.source["format"] == "openai-release"
    assert load("tiny", download_root=cache).config.vision_layers == 3
    assert len(calls) == 1  # the second load found the verified file in the cache
    with pytest.raises(clip_weights.WeightsError, match="gelu"):
        load("tiny", download_root=cache, activation="gelu")  # OpenAI's models are QuickGELU

    (cache / "tiny.pt").write_bytes(b"corrupted")
    monkeypatch.setitem(clip_weights.OPENAI_MODELS, "tiny", f"https://example.invalid/{'0' * 64}/tiny.pt")
    with pytest.raises(clip_weights.WeightsError, match="SHA-256"):
        load("tiny", download_root=cache)


def test_open_clip_heads_are_width_floor_divided_by_head_width(tmp_path):
    """open_clip makes width // head_width heads (floor), whether or not head_width divides the width."""
    model = load(open_clip_copy(tmp_path, lambda cfg: cfg["vision_cfg"].update(head_width=24)))
    assert model.config.vision_heads == 64 // 24 == 2  # 24 does not divide 64: the floor, as open_clip takes it


def transformers_copy(tmp_path, edit):
    shutil.copy(HF / "model.safetensors", tmp_path)
    config = json.loads((HF / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def open_clip_whole_copy(tmp_path, edit):
    shutil.copy(OPEN_CLIP / "open_clip_model.safetensors", tmp_path)
    config = json.loads((OPEN_CLIP / "open_clip_config.json").read_text())
    edit(config)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))  # inf is written as Infinity
    return tmp_path


@pytest.mark.parametrize("copy, edit, key", [
    (transformers_copy, lambda c: c["vision_config"].update(num_attention_heads="2"),
     "vision_config.num_attention_heads"),
    (transformers_copy, lambda c: c["vision_config"].update(num_attention_heads=2.0),
     "vision_config.num_attention_heads"),
    (transformers_copy, lambda c: c["text_config"].update(num_attention_heads=3), "text_config.num_attention_heads"),
    (transformers_copy, lambda c: c.update(text_config=[1, 2]), "text_config"),
    (transformers_copy, lambda c: c.update(projection_dim=None), "projection_dim"),
    (open_clip_whole_copy, lambda c: c["model_cfg"]["vision_cfg"].update(head_width=0), "vision_cfg.head_width"),
    (open_clip_whole_copy, lambda c: c["model_cfg"]["vision_cfg"].update(head_width=128), "vision_cfg.head_width"),
    (open_clip_whole_copy, lambda c: c["model_cfg"]["vision_cfg"].update(mlp_ratio=float("inf")),
     "vision_cfg.mlp_ratio"),
    (open_clip_whole_copy, lambda c: c["model_cfg"]["text_cfg"].update(mlp_ratio=1e300), "text_cfg.mlp_ratio"),
    (open_clip_whole_copy, lambda c: c["model_cfg"]["text_cfg"].update(heads="8"), "text_cfg.heads"),
    (open_clip_whole_copy, lambda c: c["model_cfg"].update(quick_gelu="yes"), "model_cfg.quick_gelu"),
    (open_clip_whole_copy, lambda c: c.update(model_cfg=[c["model_cfg"]]), "model_cfg"),
    (open_clip_whole_copy, lambda c: c.update(preprocess_cfg=[0.5]), "preprocess_cfg"),
], ids=["heads a string", "heads a float", "heads that do not divide", "text_config a list", "projection_dim null",
        "head_width 0", "head_width over the width", "mlp_ratio inf", "mlp_ratio 1e300", "open_clip heads a string",
        "quick_gelu a string", "model_cfg a list", "preprocess_cfg a list"])
def test_config_values_of_the_wrong_type_or_range_are_refused_naming_file_and_key(tmp_path, copy, edit, key):
    folder = copy(tmp_path, edit)
    with pytest.raises(clip_weights.WeightsError) as refused:
        load(folder)
    message = str(refused.value)
    assert key in message and "config.json" in message and "\n" not in message


def test_a_hub_cache_whose_refs_main_leads_out_of_the_folder_is_refused(tmp_path):
    repo = tmp_path / "models--someone--tiny-clip"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(HF, outside)  # weights that must not be read from there
    (repo / "refs" / "main").write_text("../../outside")
    with pytest.raises(clip_weights.WeightsError, match=r"refs/main names '\.\./\.\./outside'"):
        load(repo)
