"""CLIP (ViT image tower + text Transformer) in plain PyTorch, with OpenAI's parameter names.

The model, and at the end `build_model` (a CLIP sized by a state dict's shapes, as openai/CLIP's model.py
builds one) and `load("ViT-B/32")` (a model name, or a weights file or folder). Reading the weight files
themselves (OpenAI's releases and the other formats, safely) is formats/clip_weights.py's job. Parameter names
are exactly the keys of OpenAI's release files (`visual.conv1.weight`,
`transformer.resblocks.0.attn.in_proj_weight`, `text_projection`, ...), so a released state dict loads with
`strict=True` and gives the numbers of OpenAI's reference code. Only ViT backbones exist here.

The towers expose their stages, so that VoP (vop.py) can run its own loop over the residual blocks and insert
prompt tokens between them without a forked copy of the forward pass:

    image tower:  visual.embed(images) -> visual.ln_pre -> visual.transformer.resblocks[i] -> visual.head
    text tower:   token_embedding + positional_embedding -> transformer.resblocks[i] (causal) -> text_head

Shapes (the project's legend): B images or captions, S sequence length, D tower width, E joint embedding size,
R image side. Sequences are batch-first.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from formats.clip_weights import (RELEASE_EXTRAS, WeightsError, config_from_state_dict, read_weights,
                                  state_dict_mismatch)


@dataclass
class CLIPConfig:
    """Every size of a CLIP ViT, plus what the tensors cannot tell (head counts, activation). Defaults: ViT-B/32."""
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    vision_heads: int | None = None  # None: vision_width // 64, OpenAI's rule (open_clip's ViT-H/14: 16 of 80)
    vision_mlp_width: int | None = None  # None: 4 x width (open_clip's ViT-g and ViT-bigG differ)
    transformer_mlp_width: int | None = None  # None: 4 x width
    activation: str = "quick_gelu"  # OpenAI's; most open_clip weights (LAION, DataComp) need "gelu"

    def __post_init__(self):
        if self.vision_heads is None:
            self.vision_heads = self.vision_width // 64
        if self.vision_mlp_width is None:
            self.vision_mlp_width = 4 * self.vision_width
        if self.transformer_mlp_width is None:
            self.transformer_mlp_width = 4 * self.transformer_width
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        for heads, width in (("vision_heads", "vision_width"), ("transformer_heads", "transformer_width")):
            if getattr(self, heads) < 1 or getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{heads}: {getattr(self, heads)} heads cannot split {width} "
                                 f"{getattr(self, width)} into equal parts")


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in float32 (fp16 statistics are unstable), returning the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's sigmoid approximation of GELU; its CLIPs were trained with it, so it is part of the weights."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class SelfAttention(nn.Module):
    """Multi-head self-attention with the packed q/k/v weights of `nn.MultiheadAttention` (the checkpoint's
    layout), computed by `F.scaled_dot_product_attention` so fused kernels are used where available."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, S, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3D)
        q, k, v = qkv.view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, S, D/heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, S, D/heads)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", ACTIVATIONS[activation]()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # (B, S, D) -> (B, S, D)
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width, activation)
                                        for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # (B, S, D) -> (B, S, D)
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 mlp_width: int, activation: str):
        super().__init__()
        self.input_resolution = resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_width, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with [CLS] in front and positional embeddings added; ln_pre is not applied yet."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, D, R/patch, R/patch)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + N, D)

    def head(self, cls_tokens: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., E)
        return self.ln_post(cls_tokens) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, R, R) -> (B, E)
        x = self.transformer(self.ln_pre(self.embed(images)))
        return self.head(x[:, 0])


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        c = config
        self.context_length = c.context_length
        self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width, c.vision_layers,
                                        c.vision_heads, c.embed_dim, c.vision_mlp_width, c.activation)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads,
                                       c.transformer_mlp_width, c.activation)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        # log(1 / temperature). OpenAI starts training at log(1 / 0.07) = 2.66 and learns it up to its clamp,
        # log(100): every released checkpoint holds 4.6052. Here it is never learned (train.py and VoP keep it
        # frozen, as the paper does), so a CLIP trained from scratch (the demo) starts and stays at the
        # released value, a scale of 100, rather than at a temperature it could never leave.
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation of the weights, used when a CLIP is trained from scratch (the demo)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            proj_std = (tower.width ** -0.5) * ((2 * tower.layers) ** -0.5)
            attn_std, fc_std = tower.width ** -0.5, (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, R, R) -> (B, E), not normalised
        return self.visual(images)

    def text_head(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Read the sentence out of the final token sequence at each caption's [EOT]."""
        x = self.ln_final(x)  # (B, S, D)
        return x[torch.arange(x.shape[0], device=x.device), eot_index] @ self.text_projection  # (B, E)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, E), not normalised
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding.to(self.dtype)  # (B, S, D)
        x = self.transformer(x, causal=True)
        # [EOT] has the largest id in the vocabulary, so argmax finds it.
        return self.text_head(x, tokens.argmax(dim=-1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B images, B texts)
        return logits_per_image, logits_per_image.t()


# ---------------------------------------------------------------------------------------------------------
# Building a CLIP from weights: infer the sizes from the tensors, load strictly (OpenAI's build_model)
# ---------------------------------------------------------------------------------------------------------

def build_model(state_dict: dict, **config) -> CLIP:
    """A float32 CLIP in eval mode whose weights are exactly `state_dict` (OpenAI's names).

    Sizes are inferred from the tensors; `config` gives the CLIPConfig fields they cannot tell, e.g.
    `activation="gelu"`, `vision_heads=16` (see config_from_state_dict). Loading is strict: a missing,
    unexpected or misshapen tensor is an error listing them, never a half-loaded model.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in RELEASE_EXTRAS}
    model = CLIP(CLIPConfig(**config_from_state_dict(state_dict, **config)))
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise WeightsError(f"the state dict does not match the CLIP architecture inferred from it: {mismatch}")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
         download_root: str | os.PathLike | None = None, activation: str | None = None,
         sha256: str | None = None) -> CLIP:
    """A CLIP in eval mode with float32 weights on `device`.

    `name_or_path`: one of OpenAI's model names (downloaded once, SHA-256 checked), or a weights file or folder
    in any format formats/clip_weights.py reads (OpenAI's release, a state dict, transformers, open_clip); no
    file runs code. `activation` ("quick_gelu" or "gelu") is for weights without a config (a state dict); a
    config that names another activation is an error. `sha256`, if given, must be the weights' digest.

    The model's `source` says what was loaded, in plain str values that rebuild the same backbone:
        {"clip": the model name, or the absolute path asked for (a file or a folder),
         "path": the absolute path of the weights file read (of the shard index, for sharded weights),
         "format": "openai-release" | "state-dict" | "transformers" | "open_clip" | "modelscope",
         "activation": "quick_gelu" | "gelu",
         "sha256": the weights file's SHA-256 (of all shards in name order, for sharded weights)}
        same = load(s["clip"], activation=s["activation"], sha256=s["sha256"])

    Weights stay float32 on every device: mixed precision comes from `torch.autocast`, never from casting the
    model, so that it can be trained safely.
    """
    weights = read_weights(name_or_path, download_root)
    if sha256 is not None and sha256 != weights.sha256:
        raise WeightsError(f"{weights.path}: SHA-256 {weights.sha256} is not the {sha256} expected (recorded when "
                           f"the checkpoint was trained): these are other weights")
    if activation is not None and weights.config.get("activation", activation) != activation:
        raise WeightsError(f"{weights.path}: activation {activation!r} was asked for, but "
                           f"{weights.config_path or 'OpenAI'} says {weights.config['activation']!r}; drop the "
                           f"activation (it is only for weights that carry no config)")
    return from_weights(weights, **({"activation": activation} if activation else {})).to(device)


def from_weights(weights, **config) -> CLIP:
    """build_model on read weights (formats/clip_weights.py's Weights: tensors under OpenAI's names and where
    they came from), with `config` over the weights' own; the origin is kept as the model's `source` (see
    `load`). An error names the file."""
    try:
        model = build_model(weights.state_dict, **{**weights.config, **config})
    except WeightsError as error:
        raise WeightsError(f"{weights.path}: {error}") from None
    model.source = {"clip": weights.name, "path": str(weights.path), "format": weights.format,
                    "activation": model.config.activation, "sha256": weights.sha256}
    return model
