"""CLIP weights in the formats people hold, read without running code from any file. Skip on a first reading:
`clip_model.load(name_or_path)` is the entry point, and this module serves it.

`read_weights` returns the tensors under OpenAI's parameter names (clip_model.py's), plus what the file's config
says that the tensors cannot (head counts, activation); clip_model.build_model infers every size from the
tensors, as OpenAI's build_model does, and loads them strictly.

    format          what it is                                                  heads, activation from
    openai-release  OpenAI's release: a name such as "ViT-B/32" (downloaded     OpenAI's rules: width // 64
                    once, SHA-256 checked), or its .pt file (TorchScript zip)   heads, QuickGELU
    state-dict      tensors with OpenAI's names and no config: a torch.save'd   the same rules; for files
                    dict (or one under "state_dict"), or a .safetensors file    the caller may say "gelu"
    transformers    Hugging Face CLIPModel: a folder with config.json and       config.json: hidden_act,
                    model.safetensors or pytorch_model.bin (or shards), the     num_attention_heads
                    weights file itself, or a hub cache folder models--org--name
    open_clip       open_clip_model.safetensors or open_clip_pytorch_model.bin  open_clip_config.json: heads,
                    with open_clip_config.json next to it, or their folder      head_width, quick_gelu (else GELU)

The authors' released VoP (a ModelScope folder) holds its backbone inside its state dict: formats/modelscope.py reads it
(evaluate.py --checkpoint FOLDER), building on this module.

No file runs code. A torch.save'd file is read by `torch.load(weights_only=True)`, which unpickles tensors and
plain containers only and refuses anything else; there is no fallback. OpenAI's TorchScript archive is a zip of
a pickled module tree (data.pkl) and raw tensor storages (data/0, data/1, ...): it is read here as data, by an
unpickler that admits only tensor rebuilding and plain containers and turns each of the archive's own classes
(`__torch__.*`) into an inert placeholder that keeps its state, never by torch.jit (which would run the
archive's TorchScript). A .safetensors file is an 8-byte length, a JSON header and raw little-endian tensors:
the reader below is 40 lines, validates every offset and size, and spares the project a dependency.
"""
import collections
import hashlib
import io
import json
import math
import os
import pickle
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.errors import UserError
from utils.files import atomic_write, read_torch_file


# The input OpenAI's CLIP weights expect: images normalised with the mean and std of OpenAI's training data
# (clip/clip.py). data.py normalises frames with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsError(UserError):
    """A weights file or folder that cannot be read safely, or is not a CLIP this project can build."""


# OpenAI's public release files; the path component before the file name is the file's SHA-256.
OPENAI_MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
DEFAULT_CACHE = Path("~/.cache/vop").expanduser()

# The weights files looked for in a folder, in this order (the first found is read).
WEIGHTS_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                 "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Weights:
    """One CLIP's tensors under OpenAI's names, and where they came from."""
    state_dict: dict  # OpenAI's parameter names -> tensors (as stored: fp16 stays fp16 until build_model)
    format: str  # "openai-release" | "state-dict" | "transformers" | "open_clip" | "modelscope" (modelscope.py)
    name: str  # the model name, or the absolute path that was asked for (a file or a folder)
    path: Path  # the weights file read (the shard index, for sharded weights)
    sha256: str  # of the weights file (of all shards in name order, for sharded weights)
    config: dict = field(default_factory=dict)  # CLIPConfig fields the file's config gives
    config_path: Path | None = None  # that config file


# ---------------------------------------------------------------------------------------------------------
# What the tensors say: the architecture's sizes, and whether a state dict fits a model
# ---------------------------------------------------------------------------------------------------------

# Entries OpenAI's release files carry besides the weights.
RELEASE_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_REQUIRED_FOR_SIZES = ("visual.conv1.weight", "visual.positional_embedding", "text_projection",
                       "positional_embedding", "token_embedding.weight", "ln_final.weight")


def config_from_state_dict(state_dict: dict, **given) -> dict:
    """clip_model.CLIPConfig's fields: every size of the architecture from the tensors' shapes, as OpenAI's
    build_model does.

    `given` holds CLIPConfig fields from a config file: head counts and the activation, which the tensors cannot
    tell (without them: OpenAI's width // 64 heads and QuickGELU), and sizes, which must agree with the tensors.
    """
    sd = state_dict
    if "visual.layer1.0.conv1.weight" in sd or "visual.attnpool.positional_embedding" in sd:
        raise WeightsError("this is a ResNet CLIP (it has visual.layer1 / visual.attnpool); only ViT backbones are "
                           "supported: use ViT-B/32, ViT-B/16, ViT-L/14 or ViT-L/14@336px")
    if sd and all(name.startswith("visual.") for name in sd):
        raise WeightsError("these weights hold an image tower only (every name starts with visual.): VoP needs "
                           "CLIP's text tower too")
    missing = [k for k in _REQUIRED_FOR_SIZES if k not in sd]
    if missing:
        raise WeightsError(f"not a CLIP ViT state dict: missing {missing} (found {len(sd)} keys, e.g. "
                           f"{list(sd)[:5]})")
    vision_width, _, patch_size, _ = sd["visual.conv1.weight"].shape
    num_patches = sd["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise WeightsError(f"visual.positional_embedding holds {num_patches} patch positions, not a square grid: "
                           f"only square images are supported")
    transformer_width = sd["ln_final.weight"].shape[0]

    def count_layers(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    def mlp_width(prefix: str, width: int) -> int:
        c_fc = sd.get(prefix + "0.mlp.c_fc.weight")
        return c_fc.shape[0] if c_fc is not None else 4 * width

    sizes = dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=patch_size * grid,
        vision_layers=count_layers("visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch_size,
        vision_mlp_width=mlp_width("visual.transformer.resblocks.", vision_width),
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_layers=count_layers("transformer.resblocks."),
        transformer_mlp_width=mlp_width("transformer.resblocks.", transformer_width),
    )
    disagree = [f"{k}={given[k]} (the tensors say {sizes[k]})" for k in sizes if k in given and given[k] != sizes[k]]
    if disagree:
        raise WeightsError(f"the config does not match the weights: {', '.join(disagree)}")
    openai_rule = dict(vision_heads=vision_width // 64, transformer_heads=transformer_width // 64)
    return {**openai_rule, **given, **sizes}


def state_dict_mismatch(expected: dict, given: dict) -> str:
    """'' if `given` has exactly the names and shapes of `expected` (name -> tensor), else what differs:
    the missing and unexpected names and the wrong shapes, each list cut at 10."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = [f"{name} {tuple(given[name].shape)} instead of {tuple(tensor.shape)}"
                   for name, tensor in expected.items() if name in given and given[name].shape != tensor.shape]

    def show(names):
        return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
    return "; ".join(f"{what}: {show(names)}" for what, names in
                     (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong_shape)) if names)


def read_weights(name_or_path: str | os.PathLike, download_root: str | os.PathLike | None = None) -> Weights:
    """The tensors of OpenAI's model `name_or_path`, or of the weights file or folder at that path."""
    if str(name_or_path) in OPENAI_MODELS:
        path = download(str(name_or_path), download_root)
        sha256 = OPENAI_MODELS[str(name_or_path)].split("/")[-2]  # download has just checked it
        return Weights(read_state_dict(path), "openai-release", str(name_or_path), path, sha256,
                       config={"activation": "quick_gelu"})
    if not str(name_or_path).strip():
        raise WeightsError("no CLIP weights were named (an empty name or path)")
    asked = Path(name_or_path).expanduser().absolute()
    if not asked.exists():
        raise FileNotFoundError(f"CLIP weights {asked} do not exist; pass a model name ({', '.join(OPENAI_MODELS)}), "
                                f"a weights file or a folder holding one")
    path = find_weights_file(asked) if asked.is_dir() else asked
    kind = file_kind(path)
    tensors = read_state_dict(path)
    weights = Weights(tensors, "state-dict", str(asked), path, "")
    beside = path.parent
    if any(name.startswith(("vision_model.", "text_model.")) for name in tensors):
        weights.format, weights.config_path = "transformers", beside / "config.json"
        for tower, prefix in (("text", "text_model."), ("image", "vision_model.")):
            if not any(name.startswith(prefix) for name in tensors):
                raise WeightsError(f"{path} has no {tower} tower (no {prefix}* tensors): VoP needs a full CLIPModel, "
                                   f"with both towers")
        if not weights.config_path.is_file():
            raise FileNotFoundError(f"{path} holds transformers CLIP weights, but {weights.config_path} is missing: "
                                    f"it gives the head counts and activation; put the model's config.json there")
        weights.config = transformers_config(weights.config_path)
        weights.state_dict = transformers_to_openai(tensors)
    elif (beside / "open_clip_config.json").is_file() or path.name.startswith("open_clip"):
        weights.format, weights.config_path = "open_clip", beside / "open_clip_config.json"
        if not weights.config_path.is_file():
            raise FileNotFoundError(f"{path} is an open_clip checkpoint, but {weights.config_path} is missing: it "
                                    f"gives the activation (GELU unless quick_gelu) and head widths; put the "
                                    f"model's open_clip_config.json there")
        weights.config = open_clip_config(weights.config_path)
        # open_clip's CustomTextCLIP keeps the text tower under `text.`, and some models save logit_scale with
        # shape (1,); the tensors are the same.
        weights.state_dict = {name.removeprefix("text."): tensor for name, tensor in tensors.items()}
        if "logit_scale" in weights.state_dict and weights.state_dict["logit_scale"].numel() == 1:
            weights.state_dict["logit_scale"] = weights.state_dict["logit_scale"].reshape(())
    elif kind == "torchscript":
        weights.format = "openai-release"
    weights.sha256 = file_sha256(*shard_files(path)) if kind == "shard-index" else file_sha256(path)
    return weights


def _snapshot_name(ref: Path) -> str:
    """The snapshot a hub cache's refs/main names: one folder name in snapshots/, never a path that leads out."""
    name = ref.read_text(encoding="utf-8", errors="replace").strip()
    if not name or Path(name).name != name or name in (".", ".."):
        raise WeightsError(f"{ref} names {name[:80]!r}, not a folder of {ref.parent.parent / 'snapshots'}: the "
                           f"cache is damaged or crafted; pass the snapshot folder itself")
    return name


def find_weights_file(folder: Path) -> Path:
    """The weights file in `folder` (a Hugging Face hub cache folder is followed to its snapshot)."""
    if (folder / "snapshots").is_dir():  # ~/.cache/huggingface/hub/models--org--name
        ref = folder / "refs" / "main"
        main = folder / "snapshots" / _snapshot_name(ref) if ref.is_file() else None
        snapshots = sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir())
        if main is not None and main.is_dir():
            folder = main
        elif len(snapshots) == 1:
            folder = snapshots[0]
        else:
            raise FileNotFoundError(f"{folder} is a Hugging Face cache folder with {len(snapshots)} snapshots and no "
                                    f"refs/main: pass one of them: {', '.join(str(p) for p in snapshots) or '(none)'}")
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder} holds no CLIP weights file: looked for {', '.join(WEIGHTS_FILES)}; it holds "
                            f"{', '.join(present[:12]) or 'nothing'}{' ...' if len(present) > 12 else ''}. Pass the "
                            f"weights file itself if it has another name")


# ---------------------------------------------------------------------------------------------------------
# One file's tensors, under the names it stores them
# ---------------------------------------------------------------------------------------------------------

def file_kind(path: Path) -> str:
    """"torchscript", "torch" (torch.save), "safetensors" or "shard-index", from the file's first bytes."""
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path} is empty (0 bytes): an interrupted download or copy? Fetch the file again")
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):  # a zip: torch.save's format, and TorchScript's, which adds constants.pkl
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise WeightsError(f"{path} is a damaged zip archive ({error}): a truncated copy? Fetch it again") from error
        return "torchscript" if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names) else "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"\x80"):  # a bare pickle: torch.save's legacy format
        return "torch"
    if path.name.endswith(".index.json"):
        return "shard-index"
    raise WeightsError(f"{path} is not a weights file this code reads: neither a torch.save / TorchScript zip, a "
                       f"pickle, a .safetensors file nor a shard index (it starts with {head[:8]!r})")


def read_state_dict(path: Path) -> dict:
    """The tensors of one weights file, under the names it stores them (no renaming)."""
    kind = file_kind(path)
    if kind == "torchscript":
        return read_torchscript(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "shard-index":
        tensors = {}
        for shard in shard_files(path):
            tensors.update(read_state_dict(shard))
        return tensors
    obj = read_torch_file(path, WeightsError, "weights file")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a training checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a CLIP state dict of tensors")
    not_tensors = [name for name, value in obj.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise WeightsError(f"{path} is not a CLIP state dict of tensors: {not_tensors[:5]} are not tensors")
    if all(name.startswith("module.") for name in obj):  # saved from a DistributedDataParallel wrapper
        obj = {name.removeprefix("module."): tensor for name, tensor in obj.items()}
    return obj


def shard_files(index_path: Path) -> list[Path]:
    """The shard files a *.index.json names (transformers' sharded weights), in name order."""
    try:
        names = sorted(set(read_json(index_path)["weight_map"].values()))
    except (KeyError, TypeError, AttributeError) as error:
        raise WeightsError(f"{index_path} is not a shard index with a weight_map: {error}") from error
    if not names or any(not isinstance(n, str) or Path(n).name != n or n.endswith(".json") for n in names):
        raise WeightsError(f"{index_path}: its weight_map must name shard files in its own folder, got {names[:5]}")
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shards that are not there: {', '.join(missing)}")
    return [index_path.parent / n for n in names]


def file_sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length, a JSON header, then the raw little-endian tensors
# ---------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100_000_000  # the safetensors library's own bound


def read_safetensors(path: Path) -> dict:
    """The tensors of a .safetensors file. Every header entry is checked before any byte is copied: a known
    dtype, a shape of non-negative integers whose size fits int64, offsets inside the data section that span
    exactly the shape's bytes, and no two tensors sharing a byte (aliased ranges would let a small file claim
    many times its size in memory). So what is read never exceeds the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        if size < 8 or not 2 <= header_length <= min(size - 8, _MAX_HEADER):
            raise WeightsError(f"{path}: safetensors header length {header_length} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(header_length))
        except (ValueError, RecursionError) as error:  # RecursionError: nested thousands of levels deep
            reason = "is nested too deeply" if isinstance(error, RecursionError) else f"is not valid JSON ({error})"
            raise WeightsError(f"{path}: the safetensors header {reason}") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{path}: the safetensors header is not a JSON object")
        data_start, data_size = 8 + header_length, size - 8 - header_length
        entries = {name: _safetensors_entry(path, name, entry, data_size)
                   for name, entry in header.items() if name != "__metadata__"}
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
        for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
            if begin < end:
                raise WeightsError(f"{path}: tensors {name!r} and {other!r} share bytes of the data section; each "
                                   f"tensor must have its own bytes (the file is damaged or crafted)")
        tensors = {}
        for name, (dtype, shape, begin, end) in entries.items():
            buffer = bytearray(end - begin)
            f.seek(data_start + begin)
            f.readinto(buffer)
            flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
    return tensors


def _safetensors_entry(path: Path, name: str, entry, data_size: int) -> tuple:
    """(dtype, shape, begin, end) of one header entry, each checked (see read_safetensors)."""
    try:
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        shape = list(shape)
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{path}: tensor {name!r} has a bad header entry {entry!r:.200} (dtypes read: "
                           f"{', '.join(SAFETENSORS_DTYPES)})") from error
    numbers = [*shape, begin, end]
    if (not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
            or not begin <= end <= data_size or math.prod(max(n, 1) for n in shape) >= 2 ** 63):
        raise WeightsError(f"{path}: tensor {name!r}: shape {str(shape):.100} or offsets {[begin, end]!s:.100} are "
                           f"not valid for a data section of {data_size} bytes")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != math.prod(shape) * itemsize:
        raise WeightsError(f"{path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} needs "
                           f"{math.prod(shape) * itemsize} bytes, its offsets span {end - begin}")
    return dtype, shape, begin, end


# ---------------------------------------------------------------------------------------------------------
# OpenAI's TorchScript release, read as data
# ---------------------------------------------------------------------------------------------------------

class ArchiveObject:
    """Stands in for every class a TorchScript archive names (`__torch__.*`): it keeps the pickled state (a
    module's attributes: tensors, submodules, flags) and has no behaviour of its own."""

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state


_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """What `torch._utils._rebuild_tensor_v2` does for plain tensors: a view of a storage (bounds checked)."""
    if not (torch.is_tensor(storage) and isinstance(storage_offset, int)
            and all(isinstance(n, int) for n in (*size, *stride))):
        raise pickle.UnpicklingError("a tensor record that is not (storage, offset, size, stride)")
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl admitting only tensors, plain containers and placeholders."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return ArchiveObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a dtype: what persistent_load needs to read the storage
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which is not tensor data")

    def persistent_load(self, record):  # ("storage", dtype, key, location, numel): the bytes in data/<key>
        if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "storage"
                and isinstance(record[1], torch.dtype) and isinstance(record[2], str) and isinstance(record[4], int)):
            raise pickle.UnpicklingError(f"an unknown storage record {record!r:.100}")
        _, dtype, key, _, numel = record
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            if len(raw) != numel * torch.empty((), dtype=dtype).element_size():
                raise pickle.UnpicklingError(f"storage data/{key} holds {len(raw)} bytes, not {numel} x {dtype}")
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_torchscript(path: Path) -> dict:
    """The parameters and buffers of a TorchScript archive (e.g. OpenAI's release), named as its state_dict()
    names them, read without torch.jit: nothing in the file runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.rsplit("/", 1)[-1] == "data.pkl" and n.count("/") <= 1]
            if len(pickles) != 1:
                raise pickle.UnpicklingError(f"it holds {len(pickles)} top-level data.pkl, not 1")
            prefix = pickles[0][:-len("data.pkl")]
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
                raise pickle.UnpicklingError("its tensors are stored big-endian")
            root = _TensorUnpickler(archive, prefix).load()
    except Exception as error:  # anything unexpected in a crafted or damaged file: one message naming it
        raise WeightsError(f"{path} was refused as a TorchScript archive: {error}. Its tensors are read as data "
                           f"only (never with torch.jit, which would run its code)") from error
    if not isinstance(root, ArchiveObject):
        raise WeightsError(f"{path}: its data.pkl holds a {type(root).__name__}, not a TorchScript module")
    tensors = {}
    _collect_tensors(root, "", tensors, set())
    return tensors


def _collect_tensors(module: ArchiveObject, prefix: str, out: dict, seen: set):
    """Walk the module tree: tensor attributes are the parameters and buffers (a traced module, as OpenAI's,
    keeps no other tensors), other placeholders the submodules."""
    if id(module) in seen or not isinstance(module.state, dict):
        return
    seen.add(id(module))
    for name, value in module.state.items():
        if torch.is_tensor(value):
            out[prefix + name] = value
        elif isinstance(value, ArchiveObject):
            _collect_tensors(value, f"{prefix}{name}.", out, seen)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face transformers' CLIPModel
# ---------------------------------------------------------------------------------------------------------

# transformers' names -> OpenAI's, by prefix; a layer's index stays where it is. The two projections are
# nn.Linear weights (E, D) there and matrices (D, E) here, so they are transposed as well.
TRANSFORMERS_TO_OPENAI = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.": "visual.conv1.",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.": "visual.ln_pre.",  # sic: transformers' spelling
    "vision_model.encoder.layers.": "visual.transformer.resblocks.",
    "vision_model.post_layernorm.": "visual.ln_post.",
    "visual_projection.weight": "visual.proj",  # transposed
    "text_model.embeddings.token_embedding.": "token_embedding.",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.encoder.layers.": "transformer.resblocks.",
    "text_model.final_layer_norm.": "ln_final.",
    "text_projection.weight": "text_projection",  # transposed
}
# ... and inside each residual block. q_proj, k_proj and v_proj are then packed into in_proj_weight / _bias.
TRANSFORMERS_BLOCK_TO_OPENAI = {"self_attn.": "attn.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                                "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def replace_prefix(name: str, table: dict) -> str:
    """`name` with the first prefix of `table` that it starts with replaced by that prefix's value."""
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def transformers_to_openai(state_dict: dict) -> dict:
    """A transformers CLIPModel state dict under OpenAI's names. Names it does not know are kept, so that
    build_model lists them as unexpected."""
    renamed = {}
    for name, tensor in state_dict.items():
        if name.endswith("position_ids"):  # a constant arange that older transformers versions saved
            continue
        name = replace_prefix(name, TRANSFORMERS_TO_OPENAI)
        tower, found, rest = name.partition("resblocks.")
        if found:
            layer, _, inner = rest.partition(".")
            name = f"{tower}resblocks.{layer}.{replace_prefix(inner, TRANSFORMERS_BLOCK_TO_OPENAI)}"
        renamed[name] = tensor
    for name in [n for n in renamed if ".attn.q_proj." in n]:
        block, kind = name.split(".attn.q_proj.")  # kind: weight or bias
        parts = [f"{block}.attn.{p}_proj.{kind}" for p in "qkv"]
        if all(p in renamed for p in parts):
            renamed[f"{block}.attn.in_proj_{kind}"] = torch.cat([renamed.pop(p) for p in parts])  # (3D, ...)
    for name in ("visual.proj", "text_projection"):
        if name in renamed and renamed[name].dim() == 2:
            renamed[name] = renamed[name].t().contiguous()  # (E, D) -> (D, E)
    return renamed


# transformers' defaults, for the keys its save_pretrained leaves out of config.json when they equal them.
_TRANSFORMERS_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5)
_TRANSFORMERS_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def transformers_config(path: Path) -> dict:
    """CLIPConfig fields from a transformers CLIPModel config.json."""
    config = read_json(path)
    model_type = config.get("model_type")
    if model_type in ("clip_vision_model", "clip_text_model"):
        raise WeightsError(f"{path}: model_type {model_type!r} is one tower only: VoP needs a full CLIPModel "
                           f"(model_type 'clip') with both")
    if model_type != "clip":
        raise WeightsError(f"{path}: model_type {model_type!r} is not transformers' CLIP (model_type 'clip'); only "
                           f"CLIP's ViT architecture is supported")
    text, vision = (_transformers_tower(path, config, tower, defaults)
                    for tower, defaults in (("text", _TRANSFORMERS_TEXT), ("vision", _TRANSFORMERS_VISION)))
    activations = {text["hidden_act"], vision["hidden_act"]}
    if len(activations) != 1 or not activations <= {"quick_gelu", "gelu"}:
        raise WeightsError(f"{path}: hidden_act {text['hidden_act']!r} (text) / {vision['hidden_act']!r} (vision) is "
                           f"not supported: both towers must use 'quick_gelu' or both 'gelu'")
    if text["layer_norm_eps"] != 1e-5 or vision["layer_norm_eps"] != 1e-5:
        raise WeightsError(f"{path}: layer_norm_eps other than 1e-5 is not supported")
    return dict(embed_dim=_checked(path, "projection_dim", config.get("projection_dim", 512), "count"),
                image_resolution=vision["image_size"],
                vision_patch_size=vision["patch_size"], vision_width=vision["hidden_size"],
                vision_layers=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
                vision_mlp_width=vision["intermediate_size"], context_length=text["max_position_embeddings"],
                vocab_size=text["vocab_size"], transformer_width=text["hidden_size"],
                transformer_layers=text["num_hidden_layers"], transformer_heads=text["num_attention_heads"],
                transformer_mlp_width=text["intermediate_size"], activation=activations.pop())


def _transformers_tower(path: Path, config: dict, tower: str, defaults: dict) -> dict:
    """One tower's settings (text_config or vision_config over transformers' defaults), each checked."""
    name = f"{tower}_config_dict" if config.get(f"{tower}_config_dict") and not config.get(f"{tower}_config") else \
        f"{tower}_config"  # older transformers versions wrote the _dict names
    settings = {**defaults, **_checked(path, name, config.get(name) or {}, "section")}
    for key in [key for key, value in defaults.items() if isinstance(value, int)]:
        _checked(path, f"{name}.{key}", settings[key], "count")
    _checked(path, f"{name}.hidden_act", settings["hidden_act"], "name")
    _checked(path, f"{name}.layer_norm_eps", settings["layer_norm_eps"], "number")
    _check_heads(path, f"{name}.num_attention_heads", settings["num_attention_heads"], f"{name}.hidden_size",
                 settings["hidden_size"])
    return settings


# ---------------------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------------------

# open_clip settings that change what the same tensors compute (or add tensors), with the values this CLIP
# implements; any other value is refused rather than silently computed differently.
_OPEN_CLIP_FIXED = {
    "model_cfg": {"init_logit_bias": (None,), "multimodal_cfg": (None,)},
    "vision_cfg": {"ls_init_value": (None,), "attentional_pool": (False,), "no_ln_pre": (False,),
                   "pos_embed_type": ("learnable",), "final_ln_after_pool": (False,), "pool_type": ("tok",),
                   "global_average_pool": (False,), "input_patchnorm": (False,), "act_kwargs": (None, {}),
                   "norm_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,),
                   "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
                   "scale_attn": (False,), "scale_fc": (False,), "timm_model_name": (None,)},
    "text_cfg": {"text_arch": ("clip",), "variable_text": (False,), "ls_init_value": (None,), "embed_cls": (False,),
                 "no_causal_mask": (False,), "final_ln_after_pool": (False,), "pool_type": ("argmax",),
                 "proj_bias": (False,), "proj_type": ("linear", None), "act_kwargs": (None, {}),
                 "norm_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,),
                 "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
                 "scale_attn": (False,), "scale_fc": (False,), "hf_model_name": (None,)},
}


def open_clip_config(path: Path) -> dict:
    """CLIPConfig fields from an open_clip_config.json (or a bare open_clip model config)."""
    config = read_json(path)
    model = _checked(path, "model_cfg", config.get("model_cfg", config), "section")
    vision, text = model.get("vision_cfg"), model.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict) or "embed_dim" not in model:
        raise WeightsError(f"{path} lacks embed_dim, vision_cfg or text_cfg: not an open_clip image-text model")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise WeightsError(f"{path}: vision_cfg.layers {vision['layers']} describes a ResNet image tower; only ViT "
                           f"backbones are supported")
    for part, settings in (("model_cfg", model), ("vision_cfg", vision), ("text_cfg", text)):
        for key, allowed in _OPEN_CLIP_FIXED[part].items():
            if settings.get(key, allowed[0]) not in allowed:
                raise WeightsError(f"{path}: {part}.{key} = {settings[key]!r} is an architecture this CLIP does not "
                                   f"implement (it computes {key} = {allowed[0]!r})")
    preprocess = _checked(path, "preprocess_cfg", config.get("preprocess_cfg") or {}, "section")
    for key, openai in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        values = preprocess.get(key, openai)
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(isinstance(a, (int, float)) and abs(a - b) < 1e-4 for a, b in zip(values, openai))):
            warnings.warn(f"{path}: preprocess_cfg.{key} {values} is not OpenAI's {list(openai)}, with which this "
                          f"project normalises frames (data.py): features will be somewhat off", stacklevel=2)
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(map(repr, image_size))) != 1:
            raise WeightsError(f"{path}: vision_cfg.image_size {image_size} is not square; only square images work")
        image_size = image_size[0]

    def count(part: str, settings: dict, key: str, default: int) -> int:
        return _checked(path, f"{part}.{key}", settings.get(key, default), "count")

    vision_width, head_width = count("vision_cfg", vision, "width", 768), count("vision_cfg", vision, "head_width", 64)
    text_width, text_heads = count("text_cfg", text, "width", 512), count("text_cfg", text, "heads", 8)
    _check_heads(path, "vision_cfg.head_width", vision_width // head_width, "vision_cfg.width", vision_width)
    _check_heads(path, "text_cfg.heads", text_heads, "text_cfg.width", text_width)

    def mlp_width(part: str, settings: dict, width: int) -> int:
        ratio = _checked(path, f"{part}.mlp_ratio", settings.get("mlp_ratio", 4.0), "ratio")
        if not 1 <= width * ratio < 2 ** 31:
            raise WeightsError(f"{path}: {part}.mlp_ratio = {ratio!r} makes an MLP {width * ratio:g} wide; check it")
        return int(width * ratio)

    return dict(embed_dim=count("model_cfg", model, "embed_dim", 0),
                image_resolution=_checked(path, "vision_cfg.image_size", image_size, "count"),
                vision_patch_size=count("vision_cfg", vision, "patch_size", 16), vision_width=vision_width,
                vision_layers=count("vision_cfg", vision, "layers", 12), vision_heads=vision_width // head_width,
                vision_mlp_width=mlp_width("vision_cfg", vision, vision_width),
                context_length=count("text_cfg", text, "context_length", 77),
                vocab_size=count("text_cfg", text, "vocab_size", 49408), transformer_width=text_width,
                transformer_layers=count("text_cfg", text, "layers", 12), transformer_heads=text_heads,
                transformer_mlp_width=mlp_width("text_cfg", text, text_width),
                activation="quick_gelu" if _checked(path, "model_cfg.quick_gelu", model.get("quick_gelu", False),
                                                    "flag") else "gelu")


# What each kind of config value must be, for `_checked`.
_CONFIG_KINDS = {
    "count": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "ratio": ("a finite number > 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v) and v > 0),
    "number": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)),
    "flag": ("true or false", lambda v: isinstance(v, bool)),
    "name": ("a string", lambda v: isinstance(v, str)),
    "section": ("an object", lambda v: isinstance(v, dict)),
}


def _checked(path: Path, key: str, value, kind: str):
    """`value`, the setting `key` of the config file `path`, if it is of `kind` (see _CONFIG_KINDS); a
    WeightsError naming the file and the key otherwise."""
    what, valid = _CONFIG_KINDS[kind]
    if not valid(value):
        raise WeightsError(f"{path}: {key} must be {what}, got {json.dumps(value)[:60]}")
    return value


def _check_heads(path: Path, heads_key: str, heads, width_key: str, width: int) -> None:
    if not (isinstance(heads, int) and heads >= 1 and width % heads == 0):
        raise WeightsError(f"{path}: {heads_key} gives {heads} attention heads, which cannot split {width_key} = "
                           f"{width} into equal parts")


def read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deep
        raise WeightsError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise WeightsError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


# ---------------------------------------------------------------------------------------------------------
# OpenAI's release files by name
# ---------------------------------------------------------------------------------------------------------

def download(name: str, download_root: str | os.PathLike | None = None) -> Path:
    """Path of OpenAI's release file for model `name`, downloaded once and checked against its SHA-256."""
    url = OPENAI_MODELS[name]
    expected_sha = url.split("/")[-2]
    root = Path(download_root).expanduser() if download_root else DEFAULT_CACHE
    target = root / os.path.basename(url)
    if target.is_file() and file_sha256(target) == expected_sha:
        return target
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_write(target) as handle:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                handle.write(chunk)
            if digest.hexdigest() != expected_sha:  # raised inside: the download is never renamed into place
                raise WeightsError(f"downloaded {url} but its SHA-256 does not match {expected_sha}; try again")
    except OSError as error:
        raise WeightsError(
            f"could not download CLIP {name} ({error}). Download {url} by hand, put it at {target} "
            f"(or anywhere) and pass --clip {target}") from error
    return target
