"""VoP: a frozen CLIP turned into a text-video retriever by prompts (Huang et al., CVPR 2023).

This module wires CLIP (clip_model.py) and the prompt modules (prompts.py) together: it runs the towers'
residual blocks itself and puts each layer's prompt tokens into the sequence between them. It also holds the
paper's comparison rows as training modes (`tune`): which parameters learn and which stay frozen.

Legend: B videos (or captions), F frames, N patch tokens per frame, P prompt tokens, L text tokens,
D tower width, E joint embedding size.

The prompt invariant, kept in one place (`replace_prompts`): before layer i the previous layer's P prompt
outputs are cut out and layer i's prompts are put in their place, right after [SOS] / [CLS]. So every layer
sees the same sequence length, and prompts never reach the read-out. In the text tower the layer-0 prompts
enter before CLIP's positional embedding, so captions get 77 - P positions, and [EOT] moves P places right.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_model import CLIP
from prompts import ContextPrompts, FunctionPrompts, PositionPrompts, TextPrompts, VisualPrompts
from tokenizer import tokenize

VIDEO_PROMPTS = ("pos", "ctx", "fn")
TUNE_MODES = ("prompts", "zero-shot", "full", "partial", "bias", "proj")


def parse_video_prompts(video_prompts) -> tuple[str, ...]:
    """'fn,pos' or ['pos', 'fn'] -> ('pos', 'fn'): a canonical order, so configurations compare equal."""
    names = video_prompts.split(",") if isinstance(video_prompts, str) else list(video_prompts)
    names = {name.strip() for name in names if name.strip()}
    unknown = names - set(VIDEO_PROMPTS)
    if unknown:
        raise ValueError(f"unknown video prompt(s) {sorted(unknown)}: choose any of {', '.join(VIDEO_PROMPTS)}")
    return tuple(name for name in VIDEO_PROMPTS if name in names)


def replace_prompts(x: torch.Tensor, prompts: torch.Tensor, start: int, num_previous: int) -> torch.Tensor:
    """Swap the previous layer's prompts for this layer's, at positions `start`... of every sequence.

    x: (N, start + num_previous + S, D), prompts: (N, P, D) -> (N, start + P + S, D)
    """
    if num_previous == 0 and prompts.shape[1] == 0:
        return x
    return torch.cat([x[:, :start], prompts.to(x.dtype), x[:, start + num_previous:]], dim=1)


class VoP(nn.Module):
    """CLIP with VoP's text prompts and any combination of the video prompts `pos`, `ctx` and `fn`.

    tune="prompts" trains only the prompts (the backbone is frozen); the other modes are the paper's
    baselines and carry no prompts: "zero-shot" trains nothing, "full" all of CLIP, "partial" the last block of
    each tower, "bias" every bias (BitFit), "proj" the two projections. CLIP's logit scale is always frozen.
    """

    def __init__(self, clip: CLIP, video_prompts=(), num_frames: int = 12, tune: str = "prompts",
                 num_text_prompts: int = 8, num_visual_prompts: int = 8, video_prompt_length: int = 4,
                 fn_layers: int = 8, grad_checkpointing: bool = False):
        super().__init__()
        video_prompts = parse_video_prompts(video_prompts)
        if tune not in TUNE_MODES:
            raise ValueError(f"unknown tune mode {tune!r}: choose one of {', '.join(TUNE_MODES)}")
        if tune != "prompts":
            if video_prompts:
                raise ValueError(f"video prompts {video_prompts} need tune='prompts', not {tune!r}")
            num_text_prompts = num_visual_prompts = 0
        vision_layers = len(clip.visual.transformer.resblocks)
        if "fn" in video_prompts and not 1 <= fn_layers <= vision_layers:
            raise ValueError(f"fn_layers (K) must be in 1..{vision_layers}, got {fn_layers}")
        self.clip = clip
        self.video_prompts = video_prompts
        self.num_frames = num_frames
        self.tune = tune
        self.grad_checkpointing = grad_checkpointing
        self.settings = dict(video_prompts=list(video_prompts), num_frames=num_frames, tune=tune,
                             num_text_prompts=num_text_prompts, num_visual_prompts=num_visual_prompts,
                             video_prompt_length=video_prompt_length, fn_layers=fn_layers)

        text_width, vision_width = clip.transformer.width, clip.visual.transformer.width
        self.text_prompts = TextPrompts(clip.transformer.layers, num_text_prompts, text_width)
        # Layers that see one frame at a time: all of them, or the lower K when `fn` makes the rest video-wide.
        self.frame_layers = fn_layers if "fn" in video_prompts else vision_layers
        # Video prompts take `video_prompt_length` of the 8 visual tokens; the rest stay shared by all frames.
        has_frame_video_prompts = "pos" in video_prompts or "ctx" in video_prompts
        num_shared = num_visual_prompts - video_prompt_length if has_frame_video_prompts else num_visual_prompts
        self.visual_prompts = VisualPrompts(self.frame_layers, num_shared, vision_width)
        self.position_prompts = (PositionPrompts(self.frame_layers, num_frames, video_prompt_length, vision_width)
                                 if "pos" in video_prompts else None)
        self.context_prompts = (ContextPrompts(video_prompt_length, vision_width)
                                if "ctx" in video_prompts else None)
        self.function_prompts = (FunctionPrompts(vision_layers - fn_layers, num_frames, num_visual_prompts,
                                                 vision_width) if "fn" in video_prompts else None)
        self._set_trainable()

    # -- which parameters learn -----------------------------------------------------------------------------

    def _set_trainable(self):
        self.requires_grad_(self.tune == "prompts")  # the prompts learn only in prompt tuning
        clip = self.clip
        clip.requires_grad_(self.tune == "full")
        if self.tune == "partial":
            clip.visual.transformer.resblocks[-1].requires_grad_(True)
            clip.transformer.resblocks[-1].requires_grad_(True)
        elif self.tune == "bias":
            for name, parameter in clip.named_parameters():
                parameter.requires_grad_(name.endswith("bias"))
        elif self.tune == "proj":
            clip.visual.proj.requires_grad_(True)
            clip.text_projection.requires_grad_(True)
        clip.logit_scale.requires_grad_(False)  # the paper keeps CLIP's temperature (scale 100)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the tensors that learn: what a checkpoint needs, a few MB instead of CLIP's hundreds."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: dict, saved_settings: dict | None = None):
        """Load tensors saved by `trainable_state_dict`; refuse those of another configuration, naming it."""
        if saved_settings is not None:
            differences = [f"{key}: checkpoint {saved_settings.get(key)!r}, model {value!r}"
                           for key, value in self.settings.items() if saved_settings.get(key) != value]
            if differences:
                raise ValueError("checkpoint was saved for another VoP configuration: " + "; ".join(differences))
        expected = dict((name, p) for name, p in self.named_parameters() if p.requires_grad)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong_shape = [f"{name} {tuple(state_dict[name].shape)} vs {tuple(p.shape)}"
                       for name, p in expected.items() if name in state_dict and state_dict[name].shape != p.shape]
        if missing or unexpected or wrong_shape:
            raise ValueError(f"checkpoint does not fit this VoP ({self.settings}): missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}, wrong shapes {wrong_shape[:8]}")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(state_dict[name])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    # -- text -----------------------------------------------------------------------------------------------

    @property
    def text_context_length(self) -> int:
        """Caption tokens that fit next to the prompts in CLIP's 77 positions (77 - P)."""
        return self.clip.context_length - self.text_prompts.num_tokens

    def tokenize(self, captions: list[str]) -> torch.Tensor:  # -> (B, 77 - P)
        return tokenize(captions, context_length=self.text_context_length)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, E), L2-normalised
        tokens = self._fit_text_budget(tokens)
        clip, num_prompts = self.clip, self.text_prompts.num_tokens
        x = clip.token_embedding(tokens)  # (B, L, D)
        for layer, block in enumerate(clip.transformer.resblocks):
            prompts = self.text_prompts(layer).expand(len(x), -1, -1)  # (B, P, D)
            x = replace_prompts(x, prompts, start=1, num_previous=0 if layer == 0 else num_prompts)  # (B, P + L, D)
            if layer == 0:
                x = x + clip.positional_embedding[: x.shape[1]].to(x.dtype)
            x = self._run_block(block, x, causal=True)
        # [EOT] has the largest token id; the prompts in front of it moved it num_prompts places right.
        eot_index = tokens.argmax(dim=-1) + num_prompts
        return F.normalize(clip.text_head(x, eot_index), dim=-1)

    def _fit_text_budget(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cut the padding after the batch's last [EOT]: under the causal mask nothing after a caption's
        [EOT] reaches its read-out, so this changes no number, and captions (~10 tokens) no longer pay for
        77 positions. Refuse captions that do not fit beside the prompts."""
        budget = self.text_context_length
        length = int(tokens.argmax(dim=-1).max()) + 1  # [EOT] has the largest id
        if length > budget:
            raise ValueError(
                f"captions of {length} tokens do not fit beside {self.text_prompts.num_tokens} text prompts in "
                f"CLIP's {self.clip.context_length} positions: tokenize with context_length={budget} (VoP.tokenize "
                f"does), which truncates long captions keeping [EOT]")
        return tokens[:, :length]

    # -- video ----------------------------------------------------------------------------------------------

    def frame_prompts(self, layer: int, cls_tokens: torch.Tensor) -> torch.Tensor:
        """The visual prompts of every frame for one per-frame layer: shared, then position, then generated.

        cls_tokens: (B, F, D), the frames' [CLS] tokens entering the layer -> (B, F, P, D)
        """
        B, F_, _ = cls_tokens.shape
        parts = [self.visual_prompts(layer).expand(B, F_, -1, -1)]
        if self.position_prompts is not None:
            parts.append(self.position_prompts(layer).expand(B, -1, -1, -1))
        if self.context_prompts is not None:
            parts.append(self.context_prompts(cls_tokens).to(parts[0].dtype))
        return torch.cat(parts, dim=2)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame embeddings (B, F, E), not normalised, from frames (B, F, 3, H, W)."""
        B, F_ = frames.shape[:2]
        if self.video_prompts and F_ != self.num_frames:
            raise ValueError(f"this VoP was built for {self.num_frames} frames per video, got {F_}")
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        x = visual.embed(frames.flatten(0, 1))  # (B*F, 1 + N, D)
        D = x.shape[-1]
        num_prompts = 0
        for layer in range(self.frame_layers):
            prompts = self.frame_prompts(layer, x[:, 0].view(B, F_, D))  # (B, F, P, D)
            x = replace_prompts(x, prompts.flatten(0, 1), start=1, num_previous=num_prompts)  # (B*F, 1 + P + N, D)
            num_prompts = prompts.shape[2]
            if layer == 0:
                x = visual.ln_pre(x)  # the layer-0 prompts pass through ln_pre like the patch tokens
            x = self._run_block(blocks[layer], x)
        if self.function_prompts is None:
            return visual.head(x[:, 0]).view(B, F_, -1)

        # VoP^F: the upper layers run over whole videos: [F x CLS | P video prompts | F*N patch tokens].
        x = replace_prompts(x, x[:, :0], start=1, num_previous=num_prompts)  # (B*F, 1 + N, D): frame prompts out
        x = x.view(B, F_, -1, D) + self.function_prompts.frame_position[:, None].to(x.dtype)  # (B, F, 1 + N, D)
        x = torch.cat([x[:, :, 0], x[:, :, 1:].flatten(1, 2)], dim=1)  # (B, F + F*N, D)
        num_prompts = 0
        for video_layer, block in enumerate(blocks[self.frame_layers:]):
            prompts = self.function_prompts(video_layer).expand(B, -1, -1)  # (B, P, D)
            x = replace_prompts(x, prompts, start=F_, num_previous=num_prompts)  # (B, F + P + F*N, D)
            num_prompts = prompts.shape[1]
            x = self._run_block(block, x)
        return visual.head(x[:, :F_])  # (B, F, E)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:  # (B, F, 3, H, W) -> (B, E), L2-normalised
        frame_embeddings = F.normalize(self.encode_frames(frames), dim=-1)  # (B, F, E)
        return F.normalize(frame_embeddings.mean(dim=1), dim=-1)

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor):
        return self.encode_video(frames), self.encode_text(tokens)

    def _run_block(self, block: nn.Module, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the block's activations in the backward pass instead of storing them.
            return checkpoint(block, x, causal, use_reentrant=False)
        return block(x, causal=causal)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model: nn.Module) -> str:
    """As the paper prints it, e.g. '0.12M trainable (122,880), 0.08% of 151.40M'."""
    trainable, total = count_parameters(model)
    return (f"{trainable / 1e6:.2f}M trainable ({trainable:,}), {100 * trainable / total:.3f}% of "
            f"{total / 1e6:.2f}M")
