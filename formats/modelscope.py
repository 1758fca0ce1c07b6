"""The authors' released VoP, read as a weights format. Skip on a first reading.

The only trained VoP the authors published is a ModelScope model folder, `damo/cv_vit-b32_retrieval_vop`, with
the paper's baselines beside it (`..._vop_bias`, `..._vop_proj`, `..._vop_partial`). Their code
(modelscope/models/cv/vop_retrieval: model.py, model_se.py, basic_utils.py) reads such a folder:

    configuration.json   "hyperparam": input_res, num_frames, pooling_type ("avg"), vp_token_num (visual prompts,
                         every visual layer), tp_prefix_token_num and tp_suffix_token_num (text prompts, every
                         text layer); "model": {"type": "vop-retrieval-model"} or "vop-retrieval-model-se"
    VoP_msrvtt9k.pth     {"state_dict": ...}, names maybe prefixed `module.` (DataParallel): clip.* (the
                         backbone), visual_prompt_learner.visual_prompts (visual layers, 1, P, D),
                         text_prompt_learner.text_prompts (text layers, prefix + suffix, D), and image_encoder.* /
                         text_encoder.*, the same CLIP tensors under other names
    VoPSE_msrvtt9k.pth   instead, for the baselines: a trained clip.* and nothing else (plain CLIP, mean-pooled
                         frames, captions of 77 ids read out at [EOT])
    ViT-B-32.pt          OpenAI's CLIP, which the release builds before loading the state dict over it; here
                         only a fallback for a state dict without clip.*, and what tells which baseline it is

`read_release(folder)` reads and checks everything; its `weights` are the folder's CLIP under OpenAI's names
(format "modelscope"), its `prompts` the release's, renamed (`text_prompts.tokens`, `visual_prompts.tokens`).
`vop.load_release(folder)` builds this project's model from it: a `VoP` with those prompts, or for the
baselines a plain-CLIP `VoP` whose trainable tensors are those the baseline trained. Files are read with
clip_weights' readers: no file runs code.

The text layout. The paper (Sec. 3.2) and vop.py put each text layer's P prompts right after [SOS] and read the
sentence at [EOT]. The release splits them: `prefix` prompts after [SOS] and `suffix` prompts just before the
*last* of CLIP's 77 positions, the caption gets 77 - prefix - suffix ids, and the sentence is read at
argmax(ids) + prefix + suffix. With suffix > 0 that is not [EOT] but the position `suffix` places after it
(padding, or one of the suffix prompts for the longest captions), which sees the whole caption through the
causal mask. The released VoP was trained with 4 + 4, so it gives its numbers only when run this way:
`vop.ReleaseTextLayout` is that layout, a compatibility mode at the end of vop.py. With suffix 0 the two
layouts are the same and a plain `VoP` is built. The visual side is the paper's (8 prompts after [CLS], every
layer, through ln_pre at layer 0), and so is the pooling up to scale: the release averages the unit frame
embeddings without normalising the mean, VoP.encode_video normalises it, which changes no cosine.

    text, layer 0 (release)     [SOS] | prefix | ids 1 .. 75-P | suffix | last id                     (B, 77, D)
    text, next layers           the prefix and suffix places take that layer's prompts
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from formats import clip_weights
from formats.clip_weights import WeightsError, state_dict_mismatch

CONFIGURATION = "configuration.json"
BACKBONE_FILE = "ViT-B-32.pt"
# configuration.json's model type -> the state dict the release's model class reads (ModelScope's metainfo).
MODEL_FILES = {"vop-retrieval-model": "VoP_msrvtt9k.pth", "vop-retrieval-model-se": "VoPSE_msrvtt9k.pth"}
BASELINE_FILE = MODEL_FILES["vop-retrieval-model-se"]
TEXT_PROMPTS, VISUAL_PROMPTS = "text_prompt_learner.text_prompts", "visual_prompt_learner.visual_prompts"
# The release's encoders name CLIP's own tensors again: image_encoder.X is clip.visual.X, text_encoder.X is clip.X.
ALIASES = {"image_encoder.": "visual.", "text_encoder.": ""}


@dataclass
class Release:
    """What a release folder holds, checked against its configuration.json."""
    weights: clip_weights.Weights  # the backbone under OpenAI's names, format "modelscope"
    prompts: dict  # this project's names -> tensors; {} for a baseline
    num_frames: int
    num_suffix_prompts: int  # of the text prompts, those the release puts before the last position
    is_baseline: bool


def is_release_folder(path) -> bool:
    """Whether `path` is a folder holding a release's state dict (VoP_msrvtt9k.pth or VoPSE_msrvtt9k.pth); a
    configuration.json alone does not make one: every ModelScope folder has it."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in MODEL_FILES.values())


def read_release(folder) -> Release:
    """Read a release folder, checking every file against configuration.json; a WeightsError naming the file
    (FileNotFoundError for a missing one) otherwise."""
    folder = Path(folder).expanduser().absolute()
    configuration = folder / CONFIGURATION
    if not (configuration.is_file() or is_release_folder(folder)):
        raise FileNotFoundError(f"{folder} is a folder, but neither a train.py checkpoint nor the authors' ModelScope "
                                f"release ({CONFIGURATION} with {' or '.join(MODEL_FILES.values())}): pass a "
                                f"checkpoint file, or the release's folder")
    if not configuration.is_file():
        raise FileNotFoundError(f"{configuration} is missing: the release's folder holds it beside its state dict; "
                                f"download the whole folder")
    settings = clip_weights.read_json(configuration)
    model_type = settings["model"].get("type") if isinstance(settings.get("model"), dict) else None
    if model_type is not None and (not isinstance(model_type, str) or model_type not in MODEL_FILES):
        raise WeightsError(f"{configuration}: model type {model_type!r} is none of the release's "
                           f"{', '.join(MODEL_FILES)}")
    file_name = MODEL_FILES.get(model_type) or next(
        (name for name in MODEL_FILES.values() if (folder / name).is_file()), MODEL_FILES["vop-retrieval-model"])
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it holds the release's weights ({configuration} names model "
                                f"type {model_type or 'none'}); download the whole folder")
    is_baseline = file_name == BASELINE_FILE
    hyper = _hyperparameters(configuration, settings, is_baseline)

    tensors = {name.removeprefix("module."): tensor for name, tensor in clip_weights.read_state_dict(path).items()}
    backbone = {name.removeprefix("clip."): tensor for name, tensor in tensors.items() if name.startswith("clip.")}
    others = {name: tensor for name, tensor in tensors.items() if not name.startswith("clip.")}
    for name in [name for name in others if name.startswith(tuple(ALIASES))]:
        target = clip_weights.replace_prefix(name, ALIASES)
        if not (target in backbone and torch.equal(others.pop(name), backbone[target])):
            raise WeightsError(f"{path}: {name} is not a copy of clip.{target}, as it is in the release: the file is "
                               f"damaged or not the release's")
    sha256_of = [path]
    if not backbone:  # the release builds CLIP from ViT-B-32.pt first: without clip.* its weights stay
        fallback = folder / BACKBONE_FILE
        if not fallback.is_file():
            raise FileNotFoundError(f"{path} holds no clip.* backbone and {fallback} is missing: put OpenAI's "
                                    f"ViT-B-32.pt there (the release ships it)")
        backbone, sha256_of = clip_weights.read_state_dict(fallback), [path, fallback]
    try:
        sizes = clip_weights.config_from_state_dict(backbone)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None
    if hyper["input_res"] != sizes["image_resolution"]:
        raise WeightsError(f"{configuration}: input_res {hyper['input_res']} does not fit the backbone in {path}, "
                           f"which takes {sizes['image_resolution']}-pixel images")

    prefix, suffix = (0, 0) if is_baseline else (hyper["tp_prefix_token_num"], hyper["tp_suffix_token_num"])
    if prefix + suffix >= sizes["context_length"]:
        raise WeightsError(f"{configuration}: {prefix} + {suffix} text prompts leave no room for a caption in the "
                           f"backbone's {sizes['context_length']} positions")
    expected = {} if is_baseline else {  # the shapes configuration.json gives the prompt tables
        TEXT_PROMPTS: torch.empty(sizes["transformer_layers"], prefix + suffix, sizes["transformer_width"]),
        VISUAL_PROMPTS: torch.empty(sizes["vision_layers"], 1, hyper["vp_token_num"], sizes["vision_width"])}
    mismatch = state_dict_mismatch(expected, others)
    if mismatch:
        raise WeightsError(f"{path} does not fit {configuration} ({_describe(hyper, is_baseline)}): {mismatch}")
    prompts = {} if is_baseline else {"text_prompts.tokens": others[TEXT_PROMPTS],
                                      "visual_prompts.tokens": others[VISUAL_PROMPTS].flatten(1, 2)}
    weights = clip_weights.Weights(backbone, "modelscope", str(folder), path, clip_weights.file_sha256(*sha256_of),
                                   config={"activation": "quick_gelu"}, config_path=configuration)
    return Release(weights, prompts, hyper["num_frames"], suffix, is_baseline)


# What configuration.json may say: the release's values (224, 12, 8, 4, 4) with room to spare, and never so
# much that a value builds tensors or reads frames by the gigabyte before anything else can refuse it.
HYPERPARAMETER_RANGES = {"input_res": (1, 4096), "num_frames": (1, 1024), "vp_token_num": (0, 1024),
                         "tp_prefix_token_num": (0, 1024), "tp_suffix_token_num": (0, 1024)}


def _hyperparameters(configuration: Path, settings: dict, is_baseline: bool) -> dict:
    """The checked "hyperparam" entries the model needs (the baselines' model reads no prompt counts)."""
    hyper = settings.get("hyperparam")
    if not isinstance(hyper, dict):
        raise WeightsError(f"{configuration} has no \"hyperparam\" object: not the release's configuration")
    names = ["input_res", "num_frames", "pooling_type"]
    names += [] if is_baseline else ["vp_token_num", "tp_prefix_token_num", "tp_suffix_token_num"]
    missing = [name for name in names if name not in hyper]
    if missing:
        raise WeightsError(f"{configuration}: hyperparam lacks {', '.join(missing)}")
    for name in [name for name in names if name != "pooling_type"]:
        value, (least, most) = hyper[name], HYPERPARAMETER_RANGES[name]
        if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
            raise WeightsError(f"{configuration}: hyperparam {name} must be an integer from {least} to {most}, got "
                               f"{value!r}")
    if hyper["pooling_type"] != "avg":
        raise WeightsError(f"{configuration}: pooling_type {hyper['pooling_type']!r} is not the release's only "
                           f"one, 'avg' (the mean of the frames)")
    return {name: hyper[name] for name in names}


def _describe(hyper: dict, is_baseline: bool) -> str:
    if is_baseline:
        return "a baseline: CLIP's tensors only"
    return (f"{hyper['vp_token_num']} visual prompts and {hyper['tp_prefix_token_num']} + "
            f"{hyper['tp_suffix_token_num']} text prompts per layer")
