"""The authors' released VoP (formats/modelscope.py reads it, vop.load_release builds it): the fixture folder,
checked against the outputs the release's own code gave; other prefix/suffix splits, visual prompt counts and
frame counts against a literal re-implementation of the release's encoders (written here as its model.py reads:
every layer inserts the prompts and removes them after the block); the baselines; the identity a search index
sees; evaluate.py end to end; refused folders."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import cli
import clip_model
from formats import clip_weights
import data
import evaluate as ev
from formats import modelscope
from formats import video_io
from helpers import EOT, SOT, fake_tokenize, write_csv
import vop
from vop import VoP, VoPConfig

FOLDER = Path(__file__).parent / "fixtures" / "modelscope_vop"
EXPECTED = torch.load(FOLDER / "expected.pt", weights_only=True)  # inputs and the release's outputs


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |a - r| / max |r|, both L2-normalised first (the release does not normalise its pooled video)."""
    actual, reference = F.normalize(actual.float(), dim=-1), F.normalize(reference.float(), dim=-1)
    return ((actual - reference).abs().max() / reference.abs().max()).item()


def release_state_dict(folder: Path = FOLDER) -> dict:
    return torch.load(folder / "VoP_msrvtt9k.pth", weights_only=True)["state_dict"]


def backbone_of(state_dict: dict):
    """The CLIP of a release state dict (its module.clip.* tensors)."""
    prefix = "module.clip."
    return clip_model.build_model({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})


# -- the release's encoders, literally ---------------------------------------------------------------------

def release_text_features(clip, text_prompts, num_prefix, tokens):
    """(B, E) unit: model.py's TextEncoder. text_prompts (layers, prefix + suffix, D), tokens (B, 77 - P)."""
    B, num_prompts = len(tokens), text_prompts.shape[1]
    blocks = clip.transformer.resblocks
    x = clip.token_embedding(tokens)
    for layer, block in enumerate(blocks):
        prefix, suffix = text_prompts[layer, :num_prefix], text_prompts[layer, num_prefix:]
        x = torch.cat([x[:, :1], prefix.expand(B, -1, -1), x[:, 1:]], dim=1)
        x = torch.cat([x[:, :-1], suffix.expand(B, -1, -1), x[:, -1:]], dim=1)  # before the last position
        if layer == 0:
            x = x + clip.positional_embedding
        x = block(x, causal=True)
        if layer + 1 < len(blocks):
            x = torch.cat([x[:, :1], x[:, 1 + num_prefix:x.shape[1] - 1 - len(suffix)], x[:, -1:]], dim=1)
    x = clip.ln_final(x)[torch.arange(B), tokens.argmax(dim=-1) + num_prompts] @ clip.text_projection
    return F.normalize(x, dim=-1)


def release_video_features(clip, visual_prompts, videos):
    """(B, E), not normalised: model.py's ImageEncoder and avg pooling. visual_prompts (layers, 1, P, D)."""
    B, num_frames = videos.shape[:2]
    visual, num_prompts = clip.visual, visual_prompts.shape[2]
    x = visual.conv1(videos.flatten(0, 1)).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    blocks = visual.transformer.resblocks
    for layer, block in enumerate(blocks):
        x = torch.cat([x[:, :1], visual_prompts[layer].expand(len(x), -1, -1), x[:, 1:]], dim=1)
        if layer == 0:
            x = visual.ln_pre(x)
        x = block(x)
        if layer + 1 < len(blocks):
            x = torch.cat([x[:, :1], x[:, 1 + num_prompts:]], dim=1)
    frames = F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)
    return frames.view(B, num_frames, -1).mean(dim=1)


def lay_out(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """The fixture's captions as the release's tokenizer lays them out in `width` ids ([SOT] ... [EOT], zeros;
    too long: cut keeping [EOT]), plus one caption whose [EOT] is the second-to-last id, so that with suffix
    prompts the read-out lands on one of them."""
    rows = [row[:int(row.argmax()) + 1].tolist() for row in tokens] + [[SOT] + [5] * (width - 3) + [EOT]]
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        ids = ids if len(ids) <= width else ids[:width - 1] + [EOT]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


# -- the fixture: the release's own outputs -----------------------------------------------------------------

def test_fixture_matches_the_release_outputs():
    model, checkpoint = ev.load_model_from_checkpoint(FOLDER)
    assert isinstance(model, vop.ReleaseTextLayout) and model.num_suffix_prompts == 4
    assert model.text_context_length == 69 and model.num_frames == 4 and not model.training
    with torch.no_grad():
        text = model.encode_text(EXPECTED["text"])
        video = model.encode_video(EXPECTED["videos"])
        one_by_one = torch.cat([model.encode_text(row[None]) for row in EXPECTED["text"]])
        cut = model.encode_text(EXPECTED["text"][:3, :40])  # shorter rows are padded as the release's tokenizer does
    assert relative_error(text, EXPECTED["text_features"]) < 1e-5
    assert relative_error(video, EXPECTED["video_features"]) < 1e-5
    assert torch.allclose(one_by_one, text, atol=1e-6) and torch.allclose(cut, text[:3], atol=1e-6)
    # The literal re-implementation used for the other splits below gives the release's numbers too.
    state_dict, clip = release_state_dict(), backbone_of(release_state_dict())
    with torch.no_grad():
        literal_text = release_text_features(clip, state_dict["module.text_prompt_learner.text_prompts"], 4,
                                             EXPECTED["text"])
        literal_video = release_video_features(clip, state_dict["module.visual_prompt_learner.visual_prompts"],
                                               EXPECTED["videos"])
    assert relative_error(literal_text, EXPECTED["text_features"]) < 1e-5
    assert relative_error(literal_video, EXPECTED["video_features"]) < 1e-5
    assert checkpoint["vop_config"]["num_text_prompts"] == 8 and checkpoint["vop_config"]["num_visual_prompts"] == 8


def test_the_paper_layout_would_be_wrong_on_the_fixture():
    """The fixture's prompts are far from their initialisation, so running them in the paper's prefix-only layout
    gives other embeddings: the layout is what the test above checks."""
    release, _ = vop.load_release(FOLDER)
    plain = VoP(release.clip, release.config)
    plain.load_trainable_state_dict(release.trainable_state_dict())
    with torch.no_grad():
        assert relative_error(plain.eval().encode_text(EXPECTED["text"]), EXPECTED["text_features"]) > 1e-2


# -- other splits and frame counts ---------------------------------------------------------------------------

def write_variant(folder: Path, num_prefix: int, num_suffix: int, num_visual: int, num_frames: int, seed=0):
    """A copy of the fixture folder with freshly drawn prompts (std 0.5) of other counts, and its configuration."""
    shutil.copytree(FOLDER, folder)
    state_dict = release_state_dict()
    generator = torch.Generator().manual_seed(seed)
    text_layers, visual_layers = 2, 3  # the tiny CLIP's
    state_dict["module.text_prompt_learner.text_prompts"] = 0.5 * torch.randn(
        text_layers, num_prefix + num_suffix, 128, generator=generator)
    state_dict["module.visual_prompt_learner.visual_prompts"] = 0.5 * torch.randn(
        visual_layers, 1, num_visual, 128, generator=generator)
    torch.save({"state_dict": state_dict, "epoch": 1}, folder / "VoP_msrvtt9k.pth")
    edit_configuration(folder, num_frames=num_frames, vp_token_num=num_visual, tp_prefix_token_num=num_prefix,
                       tp_suffix_token_num=num_suffix)
    return state_dict


def edit_configuration(folder: Path, model_type=None, **hyperparam):
    path = folder / "configuration.json"
    configuration = json.loads(path.read_text())
    configuration["hyperparam"].update(hyperparam)
    if model_type is not None:
        configuration["model"]["type"] = model_type
    path.write_text(json.dumps(configuration))


@pytest.mark.parametrize("num_prefix, num_suffix, num_visual, num_frames",
                         [(6, 2, 8, 3), (0, 5, 2, 4), (1, 7, 0, 2), (3, 1, 4, 5), (8, 0, 8, 4)])
def test_other_splits_match_the_release_layout(tmp_path, num_prefix, num_suffix, num_visual, num_frames):
    state_dict = write_variant(tmp_path / "release", num_prefix, num_suffix, num_visual, num_frames)
    model, _ = ev.load_model_from_checkpoint(tmp_path / "release")
    # Without suffix prompts the release's layout is the paper's: a plain VoP.
    assert (type(model) is VoP) == (num_suffix == 0)
    assert model.num_frames == num_frames and model.text_context_length == 77 - num_prefix - num_suffix
    tokens = lay_out(EXPECTED["text"], model.text_context_length)
    videos = torch.randn(2, num_frames, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    clip = backbone_of(state_dict)
    with torch.no_grad():
        text, video = model.encode_text(tokens), model.encode_video(videos)
        reference_text = release_text_features(clip, state_dict["module.text_prompt_learner.text_prompts"],
                                               num_prefix, tokens)
        reference_video = release_video_features(
            clip, state_dict["module.visual_prompt_learner.visual_prompts"], videos)
    assert relative_error(text, reference_text) < 1e-5
    assert relative_error(video, reference_video) < 1e-5


# -- the baselines ------------------------------------------------------------------------------------------

def write_baseline(folder: Path, tune: str, with_original=True) -> torch.nn.Module:
    """A baseline folder (VoPSE_msrvtt9k.pth: a trained clip.* and nothing else) whose backbone is the fixture's
    CLIP with the tensors of `tune` changed; returns that trained CLIP."""
    folder.mkdir()
    clip = clip_model.load(FOLDER / "ViT-B-32.pt")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for tensor in VoP(clip, VoPConfig(tune=tune)).trainable_state_dict().values():
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    torch.save({"state_dict": {f"module.clip.{name}": t for name, t in clip.state_dict().items()}, "epoch": 5},
               folder / "VoPSE_msrvtt9k.pth")
    shutil.copy(FOLDER / "configuration.json", folder)
    edit_configuration(folder, "vop-retrieval-model-se", tp_prefix_token_num=0, tp_suffix_token_num=0)
    if with_original:
        shutil.copy(FOLDER / "ViT-B-32.pt", folder)
    return clip


@pytest.mark.parametrize("tune", ["bias", "proj", "partial", "full"])
def test_baseline_loads_as_plain_clip_with_its_trained_backbone(tmp_path, tune):
    trained = write_baseline(tmp_path / "baseline", tune)
    model, _ = ev.load_model_from_checkpoint(tmp_path / "baseline")
    assert type(model) is VoP and model.config.tune == tune and model.text_context_length == 77
    # What the baseline trained, and nothing else, is its trainable state (a search index's fingerprint).
    expected = set(VoP(trained, VoPConfig(tune=tune)).trainable_state_dict())  # clip.* names
    assert set(model.trainable_state_dict()) == expected
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(tensor, trained.state_dict()[name.removeprefix("clip.")])
    # The release's baseline pipeline: CLIP's encode_text on 77 ids (read at [EOT]), mean of unit frame features.
    tokens = lay_out(EXPECTED["text"], 77)
    with torch.no_grad():
        reference_text = trained.encode_text(tokens)
        reference_video = F.normalize(trained.encode_image(EXPECTED["videos"].flatten(0, 1)), dim=-1)
        reference_video = reference_video.view(3, 4, -1).mean(dim=1)
        assert relative_error(model.encode_text(tokens), reference_text) < 1e-5
        assert relative_error(model.encode_video(EXPECTED["videos"]), reference_video) < 1e-5


def test_baseline_without_openai_weights_beside_it_counts_as_full(tmp_path):
    write_baseline(tmp_path / "baseline", "bias", with_original=False)
    assert vop.load_release(tmp_path / "baseline")[0].config.tune == "full"


# -- identity -----------------------------------------------------------------------------------------------

def test_identity_tells_releases_apart_and_rebuilds_the_backbone(tmp_path):
    model, checkpoint = vop.load_release(FOLDER)
    source = model.clip.source
    assert source["format"] == "modelscope" and source["clip"] == str(FOLDER.absolute())
    assert source["sha256"] == clip_weights.file_sha256(FOLDER / "VoP_msrvtt9k.pth") == checkpoint["run"][
        "backbone_sha256"]
    assert set(model.trainable_state_dict()) == {"text_prompts.tokens", "visual_prompts.tokens"}
    again = vop.load_release(source["clip"])[0].clip  # the folder the source names gives the same backbone
    assert again.source == source
    assert all(torch.equal(tensor, model.clip.state_dict()[name]) for name, tensor in again.state_dict().items())
    write_variant(tmp_path / "other", 4, 4, 8, 4, seed=3)  # the same shapes, other prompts
    other, _ = vop.load_release(tmp_path / "other")
    assert other.clip.source["sha256"] != source["sha256"]
    assert not torch.equal(other.trainable_state_dict()["text_prompts.tokens"],
                           model.trainable_state_dict()["text_prompts.tokens"])


# -- evaluate.py end to end ---------------------------------------------------------------------------------

def test_evaluate_command_line_on_a_release_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(VoP, "tokenize", fake_tokenize)  # ReleaseTextLayout inherits it
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = []
    for name, colour in colours.items():
        frames = np.zeros((12, 48, 64, 3), np.uint8)
        frames[:, :, :] = colour
        frames[:, :, 4 * np.arange(12)[:, None] + np.arange(8)] = 255  # a white bar moves right, in front
        video_io.write_video(tmp_path / f"{name}.mp4", frames)
        rows += [[f"{name}.mp4", f"a {name} square", "test"], [f"{name}.mp4", f"the {name} one", "test"]]
    write_csv(tmp_path / "set.csv", ["video", "caption", "split"], rows)
    arguments = ["--checkpoint", str(FOLDER), "--data", "csv", "--data-root", str(tmp_path / "set.csv"),
                 "--device", "cpu", "--num-workers", "0", "--batch-size", "2"]
    results = ev.main(arguments)
    out = capsys.readouterr().out
    assert out.startswith("csv test") and "text -> video" in out and "training rows" not in out
    # The same numbers as the model's own embeddings of the set: 4 frames of 64 px, from configuration.json.
    model, _ = ev.load_model_from_checkpoint(FOLDER)
    dataset = data.build_dataset("csv", tmp_path / "set.csv", "test", num_frames=4, image_size=64)
    text, video = ev.embed(model, dataset, batch_size=3, num_workers=0)
    assert results == ev.metrics_from_embeddings(text, video, dataset.caption_video_index)
    # Without a dataset: one line saying what is needed.
    assert run_evaluate(arguments[:2]) == 2
    assert "--data and --data-root are needed" in capsys.readouterr().err


def run_evaluate(arguments) -> int:
    with pytest.raises(SystemExit) as stopped:
        cli.run_command(ev.main, arguments, "evaluate.py")
    return stopped.value.code


# -- refused folders ----------------------------------------------------------------------------------------

def test_a_release_without_a_dataset_is_told_so_before_its_model_is_read(monkeypatch):
    monkeypatch.setattr(ev, "load_model_from_checkpoint", lambda *args: pytest.fail("the model was read first"))
    with pytest.raises(cli.ConfigError, match="--data and --data-root are needed"):
        ev.main(["--checkpoint", str(FOLDER)])


def test_missing_files_are_named(tmp_path, capsys):
    folder = tmp_path / "release"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="neither a train.py checkpoint nor"):
        ev.load_model_from_checkpoint(folder)
    shutil.copy(FOLDER / "configuration.json", folder)
    assert run_evaluate(["--checkpoint", str(folder), "--data", "csv", "--data-root", "x.csv"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(folder / "VoP_msrvtt9k.pth") in error
    (folder / "configuration.json").unlink()
    shutil.copy(FOLDER / "VoP_msrvtt9k.pth", folder)
    with pytest.raises(FileNotFoundError, match="configuration.json is missing"):
        ev.load_model_from_checkpoint(folder)
    # A state dict without clip.* takes OpenAI's CLIP beside it, as the release builds it; without that, refused.
    shutil.copy(FOLDER / "configuration.json", folder)
    prompts_only = {k: v for k, v in release_state_dict().items() if "prompt_learner" in k}
    torch.save({"state_dict": prompts_only}, folder / "VoP_msrvtt9k.pth")
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt is missing"):
        ev.load_model_from_checkpoint(folder)
    shutil.copy(FOLDER / "ViT-B-32.pt", folder)
    model, _ = ev.load_model_from_checkpoint(folder)
    with torch.no_grad():
        assert relative_error(model.encode_video(EXPECTED["videos"]), EXPECTED["video_features"]) < 1e-5
    with pytest.raises(clip_weights.WeightsError, match="drop --clip"):
        ev.load_model_from_checkpoint(FOLDER, clip=str(FOLDER / "ViT-B-32.pt"))


def configured(tmp_path, **hyperparam) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(FOLDER, folder)
    edit_configuration(folder, **hyperparam)
    return folder


@pytest.mark.parametrize("hyperparam, refusal", [
    ({"tp_suffix_token_num": 2}, r"VoP_msrvtt9k.pth does not fit .*configuration.json .*wrong shapes: "
                                 r"text_prompt_learner.text_prompts \(2, 8, 128\) instead of \(2, 6, 128\)"),
    ({"vp_token_num": 4}, r"visual_prompt_learner.visual_prompts \(3, 1, 8, 128\) instead of \(3, 1, 4, 128\)"),
    ({"input_res": 224}, r"configuration.json: input_res 224 does not fit the backbone"),
    ({"num_frames": 0}, r"configuration.json: hyperparam num_frames must be an integer from 1 to 1024, got 0"),
    ({"num_frames": 10 ** 12}, r"configuration.json: hyperparam num_frames must be an integer from 1 to 1024"),
    ({"vp_token_num": 10 ** 9}, r"configuration.json: hyperparam vp_token_num must be an integer from 0 to 1024"),
    ({"pooling_type": "seqTransf"}, r"configuration.json: pooling_type 'seqTransf'"),
    ({"tp_prefix_token_num": 40, "tp_suffix_token_num": 40}, r"configuration.json: 40 \+ 40 text prompts leave"),
])
def test_configuration_that_does_not_fit_is_refused(tmp_path, hyperparam, refusal):
    with pytest.raises(clip_weights.WeightsError, match=refusal):
        ev.load_model_from_checkpoint(configured(tmp_path, **hyperparam))


def test_a_model_type_that_is_not_a_name_is_refused(tmp_path):
    folder = configured(tmp_path)
    edit_configuration(folder, model_type=["vop-retrieval-model"])
    with pytest.raises(clip_weights.WeightsError, match=r"configuration.json: model type \['vop-retrieval-model'\]"):
        ev.load_model_from_checkpoint(folder)


@pytest.mark.parametrize("change, refusal", [
    ("extra", r"VoP_msrvtt9k.pth does not fit .*unexpected: temporal_prompts"),
    ("no text prompts", r"missing: text_prompt_learner.text_prompts"),
    ("alias differs", r"image_encoder.proj is not a copy of clip.visual.proj"),
    ("backbone cut", r"VoP_msrvtt9k.pth: the state dict does not match the CLIP architecture"),
])
def test_state_dict_that_does_not_fit_is_refused(tmp_path, change, refusal):
    folder = configured(tmp_path)
    state_dict = release_state_dict()
    if change == "extra":
        state_dict["module.temporal_prompts"] = torch.zeros(3)
    elif change == "no text prompts":
        del state_dict["module.text_prompt_learner.text_prompts"]
    elif change == "alias differs":
        state_dict["module.image_encoder.proj"] = state_dict["module.image_encoder.proj"] + 1
    else:
        del state_dict["module.clip.logit_scale"]
    torch.save({"state_dict": state_dict}, folder / "VoP_msrvtt9k.pth")
    with pytest.raises(clip_weights.WeightsError, match=refusal):
        ev.load_model_from_checkpoint(folder)


class RunsCode:
    """Unpickling this calls os.system: what a crafted release file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_never_run(tmp_path, capsys):
    folder = configured(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"module.clip.visual.proj": RunsCode(marker)}}, folder / "VoP_msrvtt9k.pth")
    assert run_evaluate(["--checkpoint", str(folder), "--data", "csv", "--data-root", "x.csv"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(folder / "VoP_msrvtt9k.pth") in error and "system" in error
    assert not marker.exists()


def test_other_modelscope_folders_stay_what_they_are(tmp_path):
    """Every ModelScope folder has a configuration.json: only a release's state dict makes a folder a release."""
    folder = tmp_path / "clip_on_modelscope"
    shutil.copytree(FOLDER.parent / "tiny_clip_hf", folder)
    shutil.copy(FOLDER / "configuration.json", folder)
    assert not modelscope.is_release_folder(folder)
    assert clip_model.load(folder).source["format"] == "transformers"
