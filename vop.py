"""VoP: a frozen CLIP turned into a text-video retriever by prompts (Huang et al., CVPR 2023).

This module wires CLIP (clip_model.py) and the prompt modules (prompts.py) together: it runs the towers'
residual blocks itself and puts each layer's prompt tokens into the sequence between them. It also holds the
paper's comparison rows as training modes (`tune`): which parameters learn and which stay frozen.

Legend (the project's one legend, README "Read the code"): B videos or captions, F frames, N patch tokens per
frame, P prompt tokens, L text tokens, D tower width, E joint embedding size, R image side, K layers run per
frame by VoP^F. Layers are numbered from 0, as the code indexes them: a tower of 12 blocks has layers 0..11.

The token sequences (one row per sequence; `|` separates the parts):

    text, every layer             [SOS] | P text prompts | caption tokens ... [EOT] ... padding    (B, P + L, D)
    frame, every layer (VoP)      [CLS] | P visual prompts | N patch tokens                        (B*F, 1 + P + N, D)
        P = 8 shared tokens; with `pos` and/or `ctx`: 4 shared | 4 position | 4 generated (4 = video_prompt_length)
    frame, layers 0..K-1 (fn)     as above
    video, layers K.. (fn)        F x [CLS] | P video prompts | F*N patch tokens (frame by frame)  (B, F + P + F*N, D)

The prompt invariant, kept in three one-line functions below: layer 0 *inserts* its prompts right after
[SOS] / [CLS]; before every next layer the previous layer's P prompt outputs are *replaced* by that layer's
prompts at the same places, so every layer sees the same sequence length; prompts never reach the read-out.
In the text tower the layer-0 prompts enter before CLIP's positional embedding, so captions get 77 - P
positions, and [EOT] moves P places right.

VoP^C read literally (Sec. 3.3.2): a layer's context prompts are made from the frames' [CLS] tokens as they
enter that layer. At layer 0 those are the class embedding plus position 0, the same vector for every frame of
every video, so the layer-0 context prompts are a learned constant per frame position (the BiLSTM's recurrence
still tells positions apart); from layer 1 on, the [CLS] tokens carry each frame's content. This is the
paper's description, kept as it is (tests/test_vop.py pins it).
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_model import CLIP, from_weights
from formats import clip_weights, modelscope
from formats.clip_weights import state_dict_mismatch
from utils.errors import UserError
from prompts import ContextPrompts, FunctionPrompts, PositionPrompts, TextPrompts, VisualPrompts
from tokenizer import tokenize

VIDEO_PROMPTS = ("pos", "ctx", "fn")
TUNE_MODES = ("prompts", "zero-shot", "full", "partial", "bias", "proj")


class SettingError(ValueError):
    """A VoPConfig value that is not valid (or not for this CLIP); `field` names it, so that a command line can
    name its flag."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class VocabularyError(UserError):
    """A backbone whose vocabulary is smaller than the ids the tokenizer gives."""


@dataclass(frozen=True)
class VoPConfig:
    """Everything that decides what a VoP computes (saved in checkpoints; the defaults are the paper's)."""
    video_prompts: tuple = ()  # any of "pos", "ctx", "fn" (VoP^P, VoP^C, VoP^F); () is plain VoP
    num_frames: int = 12  # F
    tune: str = "prompts"  # what learns: the prompts, or one of the paper's baselines (TUNE_MODES)
    num_text_prompts: int = 8  # P of the text tower
    num_visual_prompts: int = 8  # P of the image tower (per frame, and per video in VoP^F's upper layers)
    video_prompt_length: int = 4  # of the visual prompts, how many `pos` / `ctx` make per frame
    fn_layers: int = 8  # K: VoP^F runs layers 0..K-1 per frame, layers K.. over the whole video

    def __post_init__(self):
        object.__setattr__(self, "video_prompts", parse_video_prompts(self.video_prompts))
        if self.tune not in TUNE_MODES:
            raise SettingError("tune", f"unknown mode {self.tune!r}; choose one of {', '.join(TUNE_MODES)}")
        if self.tune != "prompts" and self.video_prompts:
            raise SettingError("video_prompts",
                               f"{','.join(self.video_prompts)} need tune 'prompts', not {self.tune!r}")
        for name in ("num_frames", "num_text_prompts", "num_visual_prompts", "video_prompt_length", "fn_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "num_frames" else 0):
                raise SettingError(name, f"must be an integer >= {1 if name == 'num_frames' else 0}, "
                                         f"got {getattr(self, name)!r}")
        if self.video_prompt_length > self.num_visual_prompts and {"pos", "ctx"} & set(self.video_prompts):
            raise SettingError("video_prompt_length", f"{self.video_prompt_length} cannot exceed num_visual_prompts "
                                                      f"({self.num_visual_prompts}), among which the video prompts "
                                                      f"take their place")

    @property
    def tunes_prompts(self) -> bool:
        """Whether the prompts learn (VoP), rather than a part of CLIP (the baselines, which carry none)."""
        return self.tune == "prompts"

    def as_dict(self) -> dict:
        """The config as plain values (lists, ints, strings), as checkpoints store it."""
        return {**asdict(self), "video_prompts": list(self.video_prompts)}


def parse_video_prompts(video_prompts) -> tuple[str, ...]:
    """'fn,pos' or ['pos', 'fn'] -> ('pos', 'fn'): a canonical order, so configurations compare equal."""
    names = video_prompts.split(",") if isinstance(video_prompts, str) else list(video_prompts)
    names = {name.strip() for name in names if name.strip()}
    unknown = names - set(VIDEO_PROMPTS)
    if unknown:
        raise SettingError("video_prompts", f"unknown {sorted(unknown)}; choose any of {', '.join(VIDEO_PROMPTS)}")
    return tuple(name for name in VIDEO_PROMPTS if name in names)


# -- the prompt invariant ---------------------------------------------------------------------------------

def insert_prompts(x: torch.Tensor, prompts: torch.Tensor, after: int) -> torch.Tensor:
    """Layer 0: put the prompts right after the first `after` tokens. (B, S, D), (B, P, D) -> (B, S + P, D)"""
    if prompts.shape[1] == 0:  # the baselines carry no prompts: skip the copy
        return x
    return torch.cat([x[:, :after], prompts.to(x.dtype), x[:, after:]], dim=1)


def replace_prompts(x: torch.Tensor, prompts: torch.Tensor, after: int) -> torch.Tensor:
    """Every next layer: the previous layer's P prompt outputs make way for this layer's P prompts.
    (B, after + P + S, D), (B, P, D) -> (B, after + P + S, D)"""
    if prompts.shape[1] == 0:
        return x
    return torch.cat([x[:, :after], prompts.to(x.dtype), x[:, after + prompts.shape[1]:]], dim=1)


def remove_prompts(x: torch.Tensor, after: int, num_prompts: int) -> torch.Tensor:
    """Drop the P prompt outputs that follow the first `after` tokens. (B, after + P + S, D) -> (B, after + S, D)"""
    if num_prompts == 0:
        return x
    return torch.cat([x[:, :after], x[:, after + num_prompts:]], dim=1)


class VoP(nn.Module):
    """CLIP with VoP's text prompts and any combination of the video prompts `pos`, `ctx` and `fn`.

    tune="prompts" trains only the prompts (the backbone is frozen); the other modes are the paper's
    baselines and carry no prompts: "zero-shot" trains nothing, "full" all of CLIP, "partial" the last block of
    each tower, "bias" every bias (BitFit), "proj" the two projections. CLIP's logit scale is always frozen.
    `grad_checkpointing` recomputes each block's activations in the backward pass (less memory, same numbers).
    """

    def __init__(self, clip: CLIP, config: VoPConfig = VoPConfig(), grad_checkpointing: bool = False):
        super().__init__()
        vision_layers = len(clip.visual.transformer.resblocks)
        if "fn" in config.video_prompts and not 1 <= config.fn_layers < vision_layers:
            raise SettingError("fn_layers", f"K must be in 1..{vision_layers - 1} for this CLIP's {vision_layers} "
                                            f"visual layers, got {config.fn_layers} (K = {vision_layers} would be "
                                            f"plain VoP)")
        if config.num_text_prompts >= clip.context_length:
            raise SettingError("num_text_prompts", f"{config.num_text_prompts} leaves no room for a caption in "
                                                   f"CLIP's {clip.context_length} positions")
        self.clip = clip
        self.config = config
        self.grad_checkpointing = grad_checkpointing
        video_prompts, video_prompt_length = config.video_prompts, config.video_prompt_length
        num_text, num_visual = (config.num_text_prompts, config.num_visual_prompts) if config.tunes_prompts else (0, 0)
        text_width, vision_width = clip.transformer.width, clip.visual.transformer.width

        self.text_prompts = TextPrompts(clip.transformer.layers, num_text, text_width)
        # How many layers see one frame at a time: all of them, or layers 0..K-1 when `fn` makes the rest
        # video-wide (encode_video_wide).
        self.num_frame_layers = config.fn_layers if "fn" in video_prompts else vision_layers
        # `pos` and `ctx` take video_prompt_length of the visual tokens; the rest stay shared by all frames.
        per_frame_video_prompts = "pos" in video_prompts or "ctx" in video_prompts
        num_shared = num_visual - video_prompt_length if per_frame_video_prompts else num_visual
        self.visual_prompts = VisualPrompts(self.num_frame_layers, num_shared, vision_width)
        self.position_prompts = (
            PositionPrompts(self.num_frame_layers, config.num_frames, video_prompt_length, vision_width)
            if "pos" in video_prompts else None)
        self.context_prompts = ContextPrompts(video_prompt_length, vision_width) if "ctx" in video_prompts else None
        self.function_prompts = (
            FunctionPrompts(range(config.fn_layers, vision_layers), config.num_frames, num_visual, vision_width)
            if "fn" in video_prompts else None)
        self._set_trainable()

    @property
    def video_prompts(self) -> tuple:
        return self.config.video_prompts

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def num_frame_prompts(self) -> int:
        """P of the per-frame layers: shared tokens, plus those `pos` and `ctx` make for each frame."""
        parts = (self.visual_prompts, self.position_prompts, self.context_prompts)
        return sum(part.num_tokens for part in parts if part is not None)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    # -- text -----------------------------------------------------------------------------------------------

    def tokenize(self, captions: list[str]) -> torch.Tensor:  # -> (B, 77 - P)
        return tokenize(captions, context_length=self.text_context_length)

    @property
    def text_context_length(self) -> int:
        """Caption tokens that fit next to the prompts in CLIP's 77 positions (77 - P)."""
        return self.clip.context_length - self.text_prompts.num_tokens

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, 77 - P) -> (B, E), L2-normalised
        clip, blocks = self.clip, self.clip.transformer.resblocks
        B, P = len(tokens), self.text_prompts.num_tokens
        x = clip.token_embedding(self._cut_padding(tokens))  # (B, L, D), L = the batch's last [EOT] + 1 <= 77 - P
        # Layer 0: the prompts enter after [SOS], *before* the positional embedding: 77 positions in all.
        x = insert_prompts(x, self.text_prompts(0).expand(B, -1, -1), after=1)  # (B, P + L, D)
        x = x + clip.positional_embedding[: x.shape[1]].to(x.dtype)
        x = self._run_block(blocks[0], x, causal=True)
        # Layers 1, 2, ...: each layer's prompts take the place of the previous layer's prompt outputs.
        for layer in range(1, len(blocks)):
            x = replace_prompts(x, self.text_prompts(layer).expand(B, -1, -1), after=1)  # (B, P + L, D)
            x = self._run_block(blocks[layer], x, causal=True)
        # Read-out: [EOT] has the largest token id; the P prompts in front of it moved it P places right.
        eot_index = tokens.argmax(dim=-1) + P  # (B,)
        return F.normalize(clip.text_head(x, eot_index), dim=-1)

    # -- video ----------------------------------------------------------------------------------------------

    def frame_prompts(self, layer: int, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The visual prompts of every frame for one per-frame layer: shared, then position, then generated.

        x: (B*F, S, D), the frames' tokens entering the layer -> (B*F, P, D)
        """
        B = len(x) // num_frames
        parts = [self.visual_prompts(layer).expand(B * num_frames, -1, -1)]  # (B*F, shared, D)
        if self.position_prompts is not None:  # VoP^P: frame j of every video gets position j's tokens
            parts.append(self.position_prompts(layer).expand(B, -1, -1, -1).flatten(0, 1))  # (B*F, length, D)
        if self.context_prompts is not None:  # VoP^C: generated from the video's [CLS] tokens entering the layer
            cls_tokens = x[:, 0].view(B, num_frames, x.shape[-1])  # (B, F, D)
            parts.append(self.context_prompts(cls_tokens).flatten(0, 1).to(parts[0].dtype))  # (B*F, length, D)
        return torch.cat(parts, dim=1)  # (B*F, P, D)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame embeddings (B, F, E), not normalised, from frames (B, F, 3, R, R)."""
        B, num_frames = frames.shape[:2]
        if self.video_prompts and num_frames != self.num_frames:
            raise ValueError(f"this VoP was built for {self.num_frames} frames per video, got {num_frames}")
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        x = visual.embed(frames.flatten(0, 1))  # (B*F, 1 + N, D): [CLS | N patches], positions added
        # Layer 0: prompts enter after [CLS], *before* ln_pre, which they pass through like the patches.
        x = visual.ln_pre(insert_prompts(x, self.frame_prompts(0, x, num_frames), after=1))  # (B*F, 1 + P + N, D)
        x = self._run_block(blocks[0], x)
        # Layers 1, 2, ... (up to K-1 with `fn`): each layer's prompts replace the previous layer's.
        for layer in range(1, self.num_frame_layers):
            x = self._run_block(blocks[layer], replace_prompts(x, self.frame_prompts(layer, x, num_frames), after=1))
        if self.function_prompts is not None:  # VoP^F: the layers from K on see the whole video at once
            return self.encode_video_wide(x, num_frames)
        return visual.head(x[:, 0]).view(B, num_frames, -1)  # each frame's [CLS] -> (B, F, E)

    def encode_video_wide(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """VoP^F (Sec. 3.3.3): layers 0..K-1 ran per frame (`encode_frames`); layers K.. of the frozen image
        tower run over one sequence per video, [F x CLS | P video prompts | F*N patches], the tokens marked with
        their frame's position. Only the prompts of those layers and the frame positions learn.

        x: (B*F, 1 + P + N, D), the frames after layer K-1 -> per-frame embeddings (B, F, E)."""
        visual, function_prompts = self.clip.visual, self.function_prompts
        blocks, K = visual.transformer.resblocks, self.config.fn_layers
        B = len(x) // num_frames
        x = remove_prompts(x, after=1, num_prompts=self.num_frame_prompts)  # (B*F, 1 + N, D)
        x = function_prompts.add_frame_position(x.view(B, num_frames, -1, x.shape[-1]))  # (B, F, 1 + N, D)
        x = torch.cat([x[:, :, 0], x[:, :, 1:].flatten(1, 2)], dim=1)  # (B, F + F*N, D): the F [CLS]s first
        # Layer K inserts the video prompts after the F [CLS]s; every later layer replaces them.
        x = insert_prompts(x, function_prompts(K).expand(B, -1, -1), after=num_frames)  # (B, F + P + F*N, D)
        x = self._run_block(blocks[K], x)
        for layer in range(K + 1, len(blocks)):
            x = replace_prompts(x, function_prompts(layer).expand(B, -1, -1), after=num_frames)
            x = self._run_block(blocks[layer], x)
        return visual.head(x[:, :num_frames])  # each frame's [CLS] -> (B, F, E)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:  # (B, F, 3, R, R) -> (B, E), L2-normalised
        frame_embeddings = F.normalize(self.encode_frames(frames), dim=-1)  # (B, F, E)
        return F.normalize(frame_embeddings.mean(dim=1), dim=-1)  # mean pooling over the frames

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor):
        return self.encode_video(frames), self.encode_text(tokens)

    # -- machinery (skip on a first reading) ----------------------------------------------------------------

    def _run_block(self, block: nn.Module, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the block's activations in the backward pass instead of storing them.
            return checkpoint(block, x, causal, use_reentrant=False)
        return block(x, causal=causal)

    def _cut_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cut the padding after the batch's last [EOT]: under the causal mask nothing after a caption's
        [EOT] reaches its read-out, so this changes no number, and captions (~10 tokens) do not pay for
        77 positions. Refuse captions that do not fit beside the prompts."""
        budget = self.text_context_length
        length = int(tokens.argmax(dim=-1).max()) + 1  # [EOT] has the largest id
        if length > budget:
            raise ValueError(
                f"captions of {length} tokens do not fit beside {self.text_prompts.num_tokens} text prompts in "
                f"CLIP's {self.clip.context_length} positions: tokenize with context_length={budget} (VoP.tokenize "
                f"does), which truncates long captions keeping [EOT]")
        return tokens[:, :length]

    def _set_trainable(self):
        """Which parameters learn: the prompts in prompt tuning; in the baselines, the part of CLIP they name."""
        tune, clip = self.config.tune, self.clip
        self.requires_grad_(tune == "prompts")
        clip.requires_grad_(tune == "full")
        if tune == "partial":
            clip.visual.transformer.resblocks[-1].requires_grad_(True)
            clip.transformer.resblocks[-1].requires_grad_(True)
        elif tune == "bias":
            for name, parameter in clip.named_parameters():
                parameter.requires_grad_(name.endswith("bias"))
        elif tune == "proj":
            clip.visual.proj.requires_grad_(True)
            clip.text_projection.requires_grad_(True)
        clip.logit_scale.requires_grad_(False)  # the paper keeps CLIP's temperature (scale 100)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the tensors that learn: what a checkpoint needs, a few MB instead of CLIP's hundreds."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: dict):
        """Load tensors saved by `trainable_state_dict`; refuse a set that does not fit, naming what differs."""
        expected = {name: p for name, p in self.named_parameters() if p.requires_grad}
        mismatch = state_dict_mismatch(expected, state_dict)
        if mismatch:
            raise ValueError(f"the saved tensors do not fit this VoP ({self.describe()}): {mismatch}")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(state_dict[name])

    def check_vocabulary(self) -> None:
        """Refuse, in one line naming the backbone's file and both sizes, a backbone whose token embedding holds
        fewer ids than this model's tokenizer gives (`tokenize`; CLIP's BPE gives ids up to 49,407): its first
        caption would end in an IndexError (a device assert on CUDA). The tokenizer's largest id is its [EOT],
        which the read-out finds as the largest id of a caption; an empty caption holds it."""
        largest = int(self.tokenize([""]).max())
        size = self.clip.token_embedding.num_embeddings
        if largest >= size:
            source = getattr(self.clip, "source", None) or {}
            where = source.get("path") or source.get("clip") or "this CLIP"
            raise VocabularyError(f"{where}: its token embedding holds {size:,} ids, but the tokenizer gives ids up "
                                  f"to {largest:,} (a vocabulary of {largest + 1:,}): these weights were not made "
                                  f"for CLIP's tokenizer; use a CLIP whose vocab_size is at least {largest + 1:,}")

    def describe(self) -> str:
        config = self.config
        prompts = ",".join(config.video_prompts) or "none"
        return f"tune={config.tune} video_prompts={prompts} frames={config.num_frames}" + (
            f" K={config.fn_layers}" if "fn" in config.video_prompts else "")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model: nn.Module) -> str:
    """e.g. '0.12M trainable (122,880), 0.081% of all 151.40M parameters'.

    The percentage divides by every parameter of the model (CLIP plus prompts). The paper's percentages divide
    by 119.8M, its count for full fine-tuning of ViT-B/32 (0.103% for VoP's 122,880), a figure the
    architecture does not give (CLIP ViT-B/32 has 151.28M parameters, 122.9M of them in the Transformer
    blocks), so ours are smaller by a constant factor of 1.26.
    """
    trainable, total = count_parameters(model)
    return (f"{trainable / 1e6:.2f}M trainable ({trainable:,}), {100 * trainable / total:.3f}% of all "
            f"{total / 1e6:.2f}M parameters")


# ----------------------------------------------------------------------------------------------------------
# The authors' released VoP, a compatibility mode (skip on a first reading). Their release splits each text
# layer's prompts between the start and the end of the caption (formats/modelscope.py describes the folder and
# the layout); it gives its published numbers only when run that way.


def load_release(folder, device="cpu") -> tuple[VoP, dict]:
    """The authors' released VoP (a ModelScope folder, formats/modelscope.py reads it) as this project's model:
    (the model in eval mode on `device`, a description in the shape of a checkpoint dict).

    `model.clip.source` says format "modelscope", the folder as "clip" and the SHA-256 of the state dict read;
    `model.trainable_state_dict()` holds the prompts (for a baseline, the tensors it trained)."""
    release = modelscope.read_release(folder)
    weights = release.weights
    clip = from_weights(weights)
    if release.is_baseline:
        model = VoP(clip, VoPConfig(tune=baseline_tune(clip, Path(weights.name) / modelscope.BACKBONE_FILE),
                                    num_frames=release.num_frames))
    else:
        prompt_counts = dict(num_text_prompts=release.prompts["text_prompts.tokens"].shape[1],
                             num_visual_prompts=release.prompts["visual_prompts.tokens"].shape[1])
        config = VoPConfig(num_frames=release.num_frames, **prompt_counts)
        model = (ReleaseTextLayout(clip, config, release.num_suffix_prompts) if release.num_suffix_prompts
                 else VoP(clip, config))
        model.load_trainable_state_dict(release.prompts)
    checkpoint = {"format": "modelscope", "config": {}, "vop_config": model.config.as_dict(),
                  "run": {"backbone": weights.name, "backbone_sha256": weights.sha256, "activation": "quick_gelu"},
                  "trainable": model.trainable_state_dict(), "num_suffix_prompts": release.num_suffix_prompts}
    return model.to(device).eval(), checkpoint


def baseline_tune(clip: CLIP, original_path: Path) -> str:
    """Which of the paper's baselines (vop.TUNE_MODES) trained this backbone: the smallest mode whose trainable
    tensors include every tensor that differs from OpenAI's CLIP beside it. Without that file: "full".
    The logit scale is left out: it scales every score alike, and VoP keeps it frozen."""
    if not original_path.is_file():
        return "full"
    original = clip_weights.read_state_dict(original_path)
    changed = {name for name, tensor in clip.state_dict().items() if name != "logit_scale"
               and not (name in original and torch.equal(original[name].float(), tensor))}
    for tune in ("zero-shot", "proj", "bias", "partial"):
        trainable = VoP(clip, VoPConfig(tune=tune)).trainable_state_dict()  # sets the flags of `clip` only
        if changed <= set(name.removeprefix("clip.") for name in trainable):
            return tune
    return "full"


class ReleaseTextLayout(VoP):
    """VoP with the release's text layout, a compatibility mode (formats/modelscope.py says why): of each text layer's
    P prompts, the first P - suffix go after [SOS] as in the paper, the last `suffix` just before the last of
    the 77 positions, and the sentence is read at argmax(ids) + P. Captions are 77 - P ids, as VoP's."""

    def __init__(self, clip: CLIP, config: VoPConfig, num_suffix_prompts: int):
        super().__init__(clip, config)
        if not 0 <= num_suffix_prompts <= self.text_prompts.num_tokens:
            raise ValueError(f"num_suffix_prompts: {num_suffix_prompts} is not between 0 and the "
                             f"{self.text_prompts.num_tokens} text prompts")
        self.num_suffix_prompts = num_suffix_prompts

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, 77 - P) -> (B, E), L2-normalised
        clip, blocks = self.clip, self.clip.transformer.resblocks
        width = self.text_context_length
        if tokens.shape[1] != width:  # the suffix's place depends on the full width: pad as the release does
            tokens = self._cut_padding(tokens)  # refuses captions longer than 77 - P
            tokens = F.pad(tokens, (0, width - tokens.shape[1]))  # (B, 77 - P), zero padding
        B, P, S = len(tokens), self.text_prompts.num_tokens, self.num_suffix_prompts
        suffix_at = clip.context_length - 1 - S  # where the suffix prompts start
        read_at = tokens.argmax(dim=-1) + P  # (B,) the release's read-out: argmax(ids) + prefix + suffix
        # Under the causal mask nothing after the batch's last read-out reaches a read-out: run up to it only.
        length = int(read_at.max()) + 1

        def prefix_and_suffix(layer: int):  # -> (B, P - S, D), (B, S, D)
            layer_prompts = self.text_prompts(layer).expand(B, -1, -1)
            return layer_prompts[:, :P - S], layer_prompts[:, P - S:]

        # Layer 0: both parts enter before the positional embedding, as the paper's prefix does.
        prefix, suffix = prefix_and_suffix(0)
        x = insert_prompts(clip.token_embedding(tokens), prefix, after=1)  # (B, 77 - S, D)
        x = insert_prompts(x, suffix, after=suffix_at)  # (B, 77, D)
        x = (x + clip.positional_embedding.to(x.dtype))[:, :length]  # (B, length, D)
        x = self._run_block(blocks[0], x, causal=True)
        # Layers 1, 2, ...: each part's places take that layer's prompts (those of the suffix inside `length`).
        for layer in range(1, len(blocks)):
            prefix, suffix = prefix_and_suffix(layer)
            x = replace_prompts(x, prefix, after=1)
            x = replace_prompts(x, suffix[:, :max(0, length - suffix_at)], after=suffix_at)
            x = self._run_block(blocks[layer], x, causal=True)
        return F.normalize(clip.text_head(x, read_at), dim=-1)

    def describe(self) -> str:
        P, S = self.text_prompts.num_tokens, self.num_suffix_prompts
        return f"{super().describe()} text layout=release ({P - S} prefix + {S} suffix prompts)"
