"""The learnable prompts of VoP, one small module per prompt type of the paper.

Each module only *makes* prompt tokens for a given layer; where they go is vop.py's job. The backbone's
weights are never touched here.

    TextPrompts       deep text prompts: P tokens per text layer                      (VoP, Sec. 3.2)
    VisualPrompts     deep visual prompts: P tokens per visual layer, shared by frames (VoP, Sec. 3.2)
    PositionPrompts   `pos`, VoP^P: one set of tokens per relative frame position      (Sec. 3.3.1)
    ContextPrompts    `ctx`, VoP^C: tokens generated per frame from the video's [CLS]s (Sec. 3.3.2)
    FunctionPrompts   `fn`,  VoP^F: video-level tokens for the upper, video-wide layers (Sec. 3.3.3)

Legend: B videos, F frames, P prompt tokens made per layer, S tokens of a frame, D width of the tower the
tokens enter.
"""
import torch
from torch import nn

PROMPT_INIT_STD = 0.02  # as in the released VoP code (and VPT)


def prompt_table(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * PROMPT_INIT_STD)


class DeepPrompts(nn.Module):
    """P learnable tokens for each layer of a tower ("deep" prompts: a fresh set enters every layer)."""

    def __init__(self, num_layers: int, num_tokens: int, width: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.tokens = prompt_table(num_layers, num_tokens, width)  # (layers, P, D)

    def forward(self, layer: int) -> torch.Tensor:  # -> (P, D)
        return self.tokens[layer]


# The paper's two deep prompt types are the same table; each has a class of its own so that the model's
# modules carry the paper's names (print(model) shows TextPrompts and VisualPrompts).


class TextPrompts(DeepPrompts):
    """VoP's deep text prompts: placed right after [SOS] in every text layer."""


class VisualPrompts(DeepPrompts):
    """VoP's deep visual prompts: placed right after [CLS] in every per-frame visual layer, the same tokens
    for every frame of every video."""


class PositionPrompts(nn.Module):
    """VoP^P: frames at the same relative position j share P tokens across all videos, so the prompts
    tell each frame where it sits in the video (mean pooling alone cannot)."""

    def __init__(self, num_layers: int, num_frames: int, num_tokens: int, width: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.tokens = prompt_table(num_layers, num_frames, num_tokens, width)  # (layers, F, P, D)

    def forward(self, layer: int) -> torch.Tensor:  # -> (F, P, D)
        return self.tokens[layer]


class ContextPrompts(nn.Module):
    """VoP^C: a context-modelling module (1-layer BiLSTM) reads the [CLS] tokens of one video's frames as
    they enter a layer, and a linear layer turns each frame's context into P prompt tokens for that frame.
    One BiLSTM and one linear layer serve all layers (the paper shares them)."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.context = nn.LSTM(width, width, num_layers=1, batch_first=True, bidirectional=True)
        self.to_tokens = nn.Linear(2 * width, num_tokens * width)

    def forward(self, cls_tokens: torch.Tensor) -> torch.Tensor:  # (B, F, D) -> (B, F, P, D)
        B, F, D = cls_tokens.shape
        context, _ = self.context(cls_tokens)  # (B, F, 2D)
        return self.to_tokens(context).view(B, F, self.num_tokens, D)


class FunctionPrompts(nn.Module):
    """VoP^F: the upper layers of the frozen image tower are given a new function, attending across the
    whole video at once. A learned frame position embedding marks which frame each token came from, and
    P video-level tokens per upper layer are placed after the F [CLS] tokens of the video sequence."""

    def __init__(self, layers: range, num_frames: int, num_tokens: int, width: int):
        super().__init__()
        self.layers, self.num_tokens = layers, num_tokens  # layers K, K+1, ... of the image tower
        self.tokens = prompt_table(len(layers), num_tokens, width)  # (vision layers - K, P, D)
        # Zero start: the video-wide layers begin from exactly the per-frame features CLIP would see.
        self.frame_position = nn.Parameter(torch.zeros(num_frames, width))  # (F, D)

    def forward(self, layer: int) -> torch.Tensor:  # layer K, K+1, ... of the image tower -> (P, D)
        return self.tokens[self.layers.index(layer)]

    def add_frame_position(self, frames: torch.Tensor) -> torch.Tensor:  # (B, F, S, D) -> (B, F, S, D)
        """Mark every token with the frame it came from, before the frames are joined into one sequence."""
        return frames + self.frame_position[:, None].to(frames.dtype)
