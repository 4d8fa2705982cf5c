"""LoRA adapters: where they come from, what is accepted, and which are resident.

- `resolve_lora_source`: the one place a SOURCE (local folder, hf://org/repo[@revision],
  http(s):// folder URL) becomes a local folder with PEFT's two files. The HTTP process
  calls it off its event loop before it asks the engine to load, so no download ever
  stalls a forward.
- `read_adapter`: PEFT's adapter_config.json + adapter_model.safetensors checked against
  the model (what we cannot serve is refused with a message naming it) and kept in host
  memory, per layer and target module.
- `LoraManager`: loaded adapters, which of them hold the `max_loras` weight slots (least
  recently used idle one leaves first), and how many requests use each. A running request
  pins its adapter's slot; `unload` of an adapter with requests waits until they finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import urllib.request
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from radixserve.layers.lora import LoraBatch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoraError(Exception):
    """A load or use the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def resolve_lora_source(source: str) -> str:
    """A local folder holding the adapter's two files, downloading them if `source` is
    remote: hf://org/repo[@revision] through the Hugging Face cache (HF_HUB_CACHE, and
    HF_HUB_OFFLINE=1 to use it without a network), an http(s) folder URL (the two files
    under it) into $XDG_CACHE_HOME (default ~/.cache)/radixserve/lora/<hash of the URL>/."""
    if source.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, _, revision = source.removeprefix("hf://").partition("@")
        try:
            return snapshot_download(
                repo, revision=revision or None, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]
            )
        except Exception as e:  # offline, unknown repo, gated: all are the source's fault
            raise LoraError(f"cannot fetch {source}: {type(e).__name__}: {e}") from e
    if source.startswith(("http://", "https://")):
        base = source if source.endswith("/") else source + "/"
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache = cache / "radixserve" / "lora"
        folder = cache / hashlib.sha256(base.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            try:
                with urllib.request.urlopen(base + name, timeout=60) as r:
                    data = r.read()
            except OSError as e:
                raise LoraError(f"cannot fetch {base + name}: {e}") from e
            tmp = folder / (name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
        return str(folder)
    if not os.path.isdir(source):
        raise LoraError(f"LoRA source {source!r} is not a folder, hf:// or http(s):// URL")
    return source


@dataclass
class Adapter:
    name: str
    source: str
    rank: int
    # (layer, PEFT module name) -> (A [r, in], scaling * B [out, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def read_adapter(
    name: str, source: str, folder: str, targets: dict, num_layers: int, max_rank: int, dtype
) -> Adapter:
    """Read and check a PEFT LoRA adapter; `targets` is the model's `lora_targets()`."""
    try:
        cfg = json.loads(Path(folder, CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise LoraError(f"{CONFIG_FILE} of {source!r} cannot be read: {e}") from e
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"peft_type {peft_type!r} is not served (only LORA)")
    unsupported = {
        "use_dora": "DoRA (use_dora)",
        "modules_to_save": "modules_to_save",
        "rank_pattern": "rank_pattern",
        "alpha_pattern": "alpha_pattern",
        "layers_to_transform": "layers_to_transform",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise LoraError(f"{what} is not supported in adapter {name!r}")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"bias={cfg['bias']!r} is not supported in adapter {name!r} (only 'none')")
    r = int(cfg.get("r", 8))
    if not 0 < r <= max_rank:
        raise LoraError(f"rank {r} of adapter {name!r} is above --max-lora-rank {max_rank}")
    modules = cfg.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    unknown = sorted(set(modules) - set(targets))
    if unknown:
        raise LoraError(
            f"target module(s) {unknown} of adapter {name!r} are not LoRA targets of this "
            f"model (it has {sorted(targets)})"
        )
    alpha = float(cfg.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder, WEIGHTS_FILE)))
    except Exception as e:
        raise LoraError(f"{WEIGHTS_FILE} of {source!r} cannot be read: {e}") from e
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in targets:
            raise LoraError(f"adapter {name!r} has tensor {key!r}, which is no served LoRA weight")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise LoraError(f"adapter {name!r} has layer {layer}; the model has {num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = t
    weights = {}
    for (layer, module), ab in pairs.items():
        _, _, fan_in, fan_out = targets[module]
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise LoraError(f"adapter {name!r} layer {layer} {module} lacks lora_A or lora_B")
        if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
            raise LoraError(
                f"adapter {name!r} layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)} do not fit rank {r} and the model's ({fan_out}, {fan_in})"
            )
        weights[(layer, module)] = (a.to(dtype), (b.float() * scaling).to(dtype))
    if not weights:
        raise LoraError(f"adapter {name!r} has no LoRA weights")
    return Adapter(name, source, r, weights)


class LoraManager:
    """Loaded adapters (host memory), the weight slots, and the requests using each."""

    def __init__(self, model, max_loras: int, max_rank: int) -> None:
        self.model = model
        self.max_rank = max_rank
        self.targets = model.lora_targets()
        self.adapters: dict[str, Adapter] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # resident, least recent first
        self.free_slots = list(range(max_loras))
        self.pins: Counter[str] = Counter()  # running requests per adapter
        self.users: Counter[str] = Counter()  # accepted, unfinished requests per adapter
        self.unloading: set[str] = set()
        model.init_lora_slots(max_loras, max_rank)

    @property
    def max_loras(self) -> int:
        return len(self.free_slots) + len(self.slot_of)

    def load(self, name: str, source: str, folder: str) -> str:
        """Load from a local `folder`; the same name and source again is a no-op."""
        known = self.adapters.get(name)
        if known is not None and name not in self.unloading:
            if known.source == source:
                return f"adapter {name!r} is already loaded"
            raise LoraError(f"adapter {name!r} is already loaded from {known.source!r}")
        if name in self.unloading:
            raise LoraError(f"adapter {name!r} is being unloaded; load it again after that")
        w = self.model.embed_tokens.weight
        self.adapters[name] = read_adapter(
            name, source, folder, self.targets, len(self.model.layers), self.max_rank, w.dtype
        )
        return f"adapter {name!r} loaded (rank {self.adapters[name].rank})"

    def loaded(self) -> dict[str, str]:
        """{name: source} of the adapters requests may use."""
        return {n: a.source for n, a in self.adapters.items() if n not in self.unloading}

    def usable(self, name: str) -> bool:
        return name in self.adapters and name not in self.unloading

    def try_unload(self, name: str) -> bool:
        """Free the adapter once no request uses it; False while some still do."""
        self.unloading.add(name)
        if self.users[name]:
            return False
        self.unloading.discard(name)
        del self.adapters[name]
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self._clear(slot)
            self.free_slots.append(slot)
        return True

    # ---- slots: pinned while a request runs ----------------------------------------------
    def acquire(self, name: str) -> int | None:
        """The slot of `name` for a request joining the batch, loading it into a free or
        the least recently used idle slot; None when every slot is pinned."""
        slot = self.slot_of.get(name)
        if slot is None:
            if self.free_slots:
                slot = self.free_slots.pop()
            else:
                idle = next((n for n in self.slot_of if not self.pins[n]), None)
                if idle is None:
                    return None
                slot = self.slot_of.pop(idle)
                self._clear(slot)
            self._write(slot, self.adapters[name])
            self.slot_of[name] = slot
        self.slot_of.move_to_end(name)
        self.pins[name] += 1
        return slot

    def release(self, name: str) -> None:
        self.pins[name] -= 1

    def batch_plan(self, lora_slots: list[int], extend_lens: list[int], device) -> LoraBatch | None:
        ranks = {s: self.adapters[n].rank for n, s in self.slot_of.items()}
        return LoraBatch.build(lora_slots, extend_lens, ranks, device)

    def _layer_slots(self, layer: int, module: str):
        path, part, _, _ = self.targets[module]
        return self.model.layers[layer].get_submodule(path).lora, part

    def _write(self, slot: int, adapter: Adapter) -> None:
        for (layer, module), (a, b) in adapter.weights.items():
            slots, part = self._layer_slots(layer, module)
            slots.write(slot, part, a, b)

    def _clear(self, slot: int) -> None:
        for layer in self.model.layers:
            for path in {t[0] for t in self.targets.values()}:
                layer.get_submodule(path).lora.clear(slot)
