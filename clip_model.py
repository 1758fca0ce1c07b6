"""CLIP (ViT image tower + text Transformer) in plain PyTorch, loading OpenAI's released checkpoints.

Parameter names are exactly the keys of OpenAI's release files (`visual.conv1.weight`,
`transformer.resblocks.0.attn.in_proj_weight`, `text_projection`, ...), so a released state dict loads with
`strict=True` and gives the numbers of OpenAI's reference code. Only ViT backbones exist here.

The towers expose their stages, so that VoP (vop.py) can run its own loop over the residual blocks and insert
prompt tokens between them without a forked copy of the forward pass:

    image tower:  visual.embed(images) -> visual.ln_pre -> visual.transformer.resblocks[i] -> visual.head
    text tower:   token_embedding + positional_embedding -> transformer.resblocks[i] (causal) -> text_head

Shapes: N images or captions, S sequence length, D width, E joint embedding size. Sequences are batch-first.
"""
import hashlib
import os
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# OpenAI's public release files; the path component before the file name is the file's SHA-256.
OPENAI_MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
DEFAULT_CACHE = Path("~/.cache/vop").expanduser()


@dataclass
class CLIPConfig:
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

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64  # as in OpenAI's build_model


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in float32 (fp16 statistics are unstable), returning the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


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
        N, S, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, S, 3D)
        q, k, v = qkv.view(N, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, H, S, D/H)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (N, H, S, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(N, S, D))  # (N, S, D)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # (N, S, D) -> (N, S, D)
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # (N, S, D) -> (N, S, D)
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with [CLS] in front and positional embeddings added; ln_pre is not applied yet."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (N, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (N, num_patches, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 1 + num_patches, D)

    def head(self, cls_tokens: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., E)
        return self.ln_post(cls_tokens) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, R, R) -> (N, E)
        x = self.transformer(self.ln_pre(self.embed(images)))
        return self.head(x[:, 0])


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        c = config
        self.context_length = c.context_length
        self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width, c.vision_layers,
                                        c.vision_heads, c.embed_dim)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(100): CLIP's learned scale, ~ln(1/0.01)
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation, used when a CLIP is trained from scratch (the synthetic demo)."""
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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, R, R) -> (N, E), not normalised
        return self.visual(images)

    def text_head(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Read the sentence out of the final token sequence at each caption's [EOT]."""
        x = self.ln_final(x)  # (N, S, D)
        return x[torch.arange(x.shape[0], device=x.device), eot_index] @ self.text_projection  # (N, E)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (N, S) -> (N, E), not normalised
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding.to(self.dtype)  # (N, S, D)
        x = self.transformer(x, causal=True)
        # [EOT] has the largest id in the vocabulary, so argmax finds it.
        return self.text_head(x, tokens.argmax(dim=-1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (N_images, N_texts)
        return logits_per_image, logits_per_image.t()


# ---------------------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------------------

# Entries OpenAI's release files carry besides the weights.
_RELEASE_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_REQUIRED_FOR_SIZES = ("visual.conv1.weight", "visual.positional_embedding", "text_projection",
                       "positional_embedding", "token_embedding.weight", "ln_final.weight")


def config_from_state_dict(state_dict: dict) -> CLIPConfig:
    """Infer every size of the architecture from the tensors' shapes, as OpenAI's build_model does."""
    sd = state_dict
    if "visual.layer1.0.conv1.weight" in sd or "visual.attnpool.positional_embedding" in sd:
        raise ValueError("this is a ResNet CLIP state dict (it has visual.layer1 / visual.attnpool); only ViT "
                         "backbones are supported: use ViT-B/32, ViT-B/16, ViT-L/14 or ViT-L/14@336px")
    missing = [k for k in _REQUIRED_FOR_SIZES if k not in sd]
    if missing:
        raise ValueError(f"not a CLIP ViT state dict: missing {missing} (found {len(sd)} keys, e.g. "
                         f"{list(sd)[:5]})")
    vision_width, _, patch_size, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    transformer_width = sd["ln_final.weight"].shape[0]

    def count_layers(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=patch_size * grid,
        vision_layers=count_layers("visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch_size,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=count_layers("transformer.resblocks."),
    )


def build_model(state_dict: dict) -> CLIP:
    """A float32 CLIP whose architecture is inferred from `state_dict` and whose weights are exactly it."""
    state_dict = {k: v for k, v in state_dict.items() if k not in _RELEASE_EXTRAS}
    model = CLIP(config_from_state_dict(state_dict))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                   if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
        raise ValueError("state dict does not match the CLIP architecture inferred from it:"
                         + (f"\n  missing keys: {show(missing)}" if missing else "")
                         + (f"\n  unexpected keys: {show(unexpected)}" if unexpected else "")
                         + (f"\n  wrong shapes: {show(wrong_shape)}" if wrong_shape else ""))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name: str, download_root: str | os.PathLike | None = None) -> Path:
    """Path of OpenAI's release file for model `name`, downloaded once and checked against its SHA-256."""
    url = OPENAI_MODELS[name]
    expected_sha = url.split("/")[-2]
    root = Path(download_root).expanduser() if download_root else DEFAULT_CACHE
    target = root / os.path.basename(url)
    if target.is_file() and _sha256(target) == expected_sha:
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download CLIP {name} ({error}). Download {url} by hand, put it at {target} "
            f"(or anywhere) and pass --clip {target}") from error
    if _sha256(partial) != expected_sha:
        partial.unlink()
        raise RuntimeError(f"downloaded {url} but its SHA-256 does not match {expected_sha}; try again")
    partial.replace(target)
    return target


def read_state_dict(path: Path) -> dict:
    """The weights of a file that is either an OpenAI release (TorchScript archive) or a torch.save'd dict."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist; pass a model name "
                                f"({', '.join(OPENAI_MODELS)}) or the path of a checkpoint file")
    if zipfile.is_zipfile(path):  # both formats are zip archives; TorchScript ones hold constants.pkl
        with zipfile.ZipFile(path) as archive:
            is_torchscript = any(n.endswith("constants.pkl") for n in archive.namelist())
        if is_torchscript:
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is the format OpenAI released
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is neither an OpenAI CLIP release file (TorchScript) nor a torch.save'd "
                         f"state dict: {error}") from error
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a CLIP state dict of tensors")
    return obj


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
         download_root: str | os.PathLike | None = None) -> CLIP:
    """A CLIP in eval mode with float32 weights on `device`, from a model name or a checkpoint file.

    Weights stay float32 on every device: mixed precision comes from `torch.autocast`, never from casting the
    model, so that it can be trained safely.
    """
    if str(name_or_path) in OPENAI_MODELS:
        path = download(str(name_or_path), download_root)
    else:
        path = Path(name_or_path).expanduser()
    return build_model(read_state_dict(path)).to(device)

