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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_model import CLIP, state_dict_mismatch
from errors import UserError
from prompts import ContextPrompts, FunctionPrompts, PositionPrompts, TextPrompts, VisualPrompts
from tokenizer import tokenize

VIDEO_PROMPTS = ("pos", "ctx", "fn")
TUNE_MODES = ("prompts", "zero-shot", "full", "partial", "bias", "proj")


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
            raise ValueError(f"tune: unknown mode {self.tune!r}; choose one of {', '.join(TUNE_MODES)}")
        if self.tune != "prompts" and self.video_prompts:
            raise ValueError(f"video_prompts: {','.join(self.video_prompts)} need tune 'prompts', not {self.tune!r}")
        for name in ("num_frames", "num_text_prompts", "num_visual_prompts", "video_prompt_length", "fn_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "num_frames" else 0):
                raise ValueError(f"{name}: must be an integer >= {1 if name == 'num_frames' else 0}, "
                                 f"got {getattr(self, name)!r}")
        if self.video_prompt_length > self.num_visual_prompts and {"pos", "ctx"} & set(self.video_prompts):
            raise ValueError(f"video_prompt_length: {self.video_prompt_length} cannot exceed num_visual_prompts "
                             f"({self.num_visual_prompts}), among which the video prompts take their place")

    @property
    def has_prompts(self) -> bool:
        return self.tune == "prompts"


def parse_video_prompts(video_prompts) -> tuple[str, ...]:
    """'fn,pos' or ['pos', 'fn'] -> ('pos', 'fn'): a canonical order, so configurations compare equal."""
    names = video_prompts.split(",") if isinstance(video_prompts, str) else list(video_prompts)
    names = {name.strip() for name in names if name.strip()}
    unknown = names - set(VIDEO_PROMPTS)
    if unknown:
        raise ValueError(f"video_prompts: unknown {sorted(unknown)}; choose any of {', '.join(VIDEO_PROMPTS)}")
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
            raise ValueError(f"fn_layers: K must be in 1..{vision_layers - 1} for this CLIP's {vision_layers} visual "
                             f"layers, got {config.fn_layers} (K = {vision_layers} would be plain VoP)")
        if config.num_text_prompts >= clip.context_length:
            raise ValueError(f"num_text_prompts: {config.num_text_prompts} leaves no room for a caption in CLIP's "
                             f"{clip.context_length} positions")
        self.clip = clip
        self.config = config
        self.grad_checkpointing = grad_checkpointing
        video_prompts, video_prompt_length = config.video_prompts, config.video_prompt_length
        num_text, num_visual = (config.num_text_prompts, config.num_visual_prompts) if config.has_prompts else (0, 0)
        text_width, vision_width = clip.transformer.width, clip.visual.transformer.width

        self.text_prompts = TextPrompts(clip.transformer.layers, num_text, text_width)
        # Layers that see one frame at a time: all of them, or layers 0..K-1 when `fn` makes the rest video-wide.
        self.frame_layers = config.fn_layers if "fn" in video_prompts else vision_layers
        # `pos` and `ctx` take video_prompt_length of the visual tokens; the rest stay shared by all frames.
        per_frame_video_prompts = "pos" in video_prompts or "ctx" in video_prompts
        num_shared = num_visual - video_prompt_length if per_frame_video_prompts else num_visual
        self.visual_prompts = VisualPrompts(self.frame_layers, num_shared, vision_width)
        self.position_prompts = (
            PositionPrompts(self.frame_layers, config.num_frames, video_prompt_length, vision_width)
            if "pos" in video_prompts else None)
        self.context_prompts = ContextPrompts(video_prompt_length, vision_width) if "ctx" in video_prompts else None
        self.function_prompts = (
            FunctionPrompts(vision_layers - config.fn_layers, config.num_frames, num_visual, vision_width)
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
        tokens = self._cut_padding(tokens)  # (B, L), L = the batch's last [EOT] + 1 <= 77 - P
        B, P = len(tokens), self.text_prompts.num_tokens
        x = clip.token_embedding(tokens)  # (B, L, D)
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

    def frame_prompts(self, layer: int, cls_tokens: torch.Tensor) -> torch.Tensor:
        """The visual prompts of every frame for one per-frame layer: shared, then position, then generated.

        cls_tokens: (B, F, D), the frames' [CLS] tokens entering the layer -> (B, F, P, D)
        """
        B, num_frames, _ = cls_tokens.shape
        parts = [self.visual_prompts(layer).expand(B, num_frames, -1, -1)]  # (B, F, shared, D)
        if self.position_prompts is not None:  # VoP^P: (B, F, video_prompt_length, D)
            parts.append(self.position_prompts(layer).expand(B, -1, -1, -1))
        if self.context_prompts is not None:  # VoP^C: (B, F, video_prompt_length, D), from this layer's [CLS]s
            parts.append(self.context_prompts(cls_tokens).to(parts[0].dtype))
        return torch.cat(parts, dim=2)  # (B, F, P, D)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame embeddings (B, F, E), not normalised, from frames (B, F, 3, R, R)."""
        B, num_frames = frames.shape[:2]
        if self.video_prompts and num_frames != self.num_frames:
            raise ValueError(f"this VoP was built for {self.num_frames} frames per video, got {num_frames}")
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        x = visual.embed(frames.flatten(0, 1))  # (B*F, 1 + N, D): [CLS | N patches], positions added

        def prompts_of(layer: int, x: torch.Tensor) -> torch.Tensor:
            """(B*F, P, D): the layer's prompts, made from the frames' [CLS] tokens as they enter it."""
            cls_tokens = x[:, 0].view(B, num_frames, x.shape[-1])  # (B, F, D)
            return self.frame_prompts(layer, cls_tokens).flatten(0, 1)

        # Layer 0: prompts enter after [CLS], *before* ln_pre, which they pass through like the patches.
        x = visual.ln_pre(insert_prompts(x, prompts_of(0, x), after=1))  # (B*F, 1 + P + N, D)
        x = self._run_block(blocks[0], x)
        # Layers 1..K-1 (1..11 without `fn`): each layer's prompts replace the previous layer's.
        for layer in range(1, self.frame_layers):
            x = self._run_block(blocks[layer], replace_prompts(x, prompts_of(layer, x), after=1))
        if self.function_prompts is None:
            return visual.head(x[:, 0]).view(B, num_frames, -1)  # each frame's [CLS] -> (B, F, E)
        return self._encode_video_wide(x, B, num_frames)

    def _encode_video_wide(self, x: torch.Tensor, B: int, num_frames: int) -> torch.Tensor:
        """VoP^F's upper layers K..: one sequence per video, [F x CLS | P video prompts | F*N patches].
        x: (B*F, 1 + P + N, D), the frames after layer K-1 -> per-frame embeddings (B, F, E)."""
        visual, function_prompts = self.clip.visual, self.function_prompts
        video_blocks = visual.transformer.resblocks[self.frame_layers:]  # layers K, K+1, ...
        x = remove_prompts(x, after=1, num_prompts=self.num_frame_prompts)  # (B*F, 1 + N, D)
        x = function_prompts.add_frame_position(x.view(B, num_frames, -1, x.shape[-1]))  # (B, F, 1 + N, D)
        x = torch.cat([x[:, :, 0], x[:, :, 1:].flatten(1, 2)], dim=1)  # (B, F + F*N, D): the F [CLS]s first
        # Video layer 0 (layer K) inserts the video prompts after the F [CLS]s; the next ones replace them.
        x = insert_prompts(x, function_prompts(0).expand(B, -1, -1), after=num_frames)  # (B, F + P + F*N, D)
        x = self._run_block(video_blocks[0], x)
        for video_layer in range(1, len(video_blocks)):
            x = replace_prompts(x, function_prompts(video_layer).expand(B, -1, -1), after=num_frames)
            x = self._run_block(video_blocks[video_layer], x)
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


def config_as_dict(config: VoPConfig) -> dict:
    """The config as plain values (lists, ints, strings), as checkpoints store it."""
    return {**asdict(config), "video_prompts": list(config.video_prompts)}


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
