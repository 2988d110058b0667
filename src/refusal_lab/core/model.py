"""Loading a chat model and its tokenizer from a local folder, a GGUF file or a hub id, read-only.

A hub id (`org/name`) is read from the Hugging Face cache (core.hub) and fetched only when asked.
On a CUDA GPU the weights may load in 4-bit (NF4) or 8-bit (LLM.int8) with bitsandbytes: hooks on
such a model work, edits of its packed weights do not, so an edit to save is made on a full-precision
copy (`unquantized`) and commands that would edit weights in place refuse (`refuse_weight_edits`).
Weights load from safetensors (never pickle); Python code in the folder runs only with an explicit
trust_remote_code. Damaged inputs (a cut or foreign weights file, a config or tokenizer that does not
parse, a .gguf that is not GGUF) are one-line errors that name the file, found before loading starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.config.sections import QUANTIZE
from refusal_lab.core.arch import SUPPORTED_FAMILIES, Adapter, adapt, check_family
from refusal_lab.core.hub import resolve
from refusal_lab.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """A model ready for probing or generation, with where it came from.

    The architecture adapter (one traced forward pass) and the weight fingerprint (reads every
    weight) are computed once per loaded model and reused by every stage of a command.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: Path
    gguf_file: str | None = None
    allow_unverified_arch: bool = False
    quantize: str = "none"  # one of QUANTIZE: how the weights were loaded
    trust_remote_code: bool = False
    _adapter: Adapter | None = field(default=None, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        """What the model is called in logs and results: the hub id where the weights are a snapshot in
        the Hugging Face cache (whose folder name is a revision hash), otherwise the file or folder name."""
        snap = self.folder
        if snap.parent.name == "snapshots" and snap.parent.parent.name.startswith("models--"):
            return snap.parent.parent.name.removeprefix("models--").replace("--", "/") + (
                f"/{self.gguf_file}" if self.gguf_file else ""
            )
        return self.source.name

    @property
    def folder(self) -> Path:
        """The model folder (a GGUF file's folder)."""
        return self.source if self.source.is_dir() else self.source.parent

    @property
    def adapter(self) -> Adapter:
        if self._adapter is None:
            self._adapter = adapt(self.model, self.allow_unverified_arch)
        return self._adapter

    @property
    def fingerprint(self) -> str:
        """Content hash of the weights as loaded (edits are applied to copies or undone, see ablate.edit)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def release(self) -> None:
        """Drop the weights, so the next model can take their memory."""
        self.model = None  # type: ignore[assignment]
        self._adapter = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fingerprint(model: torch.nn.Module) -> str:
    """Cheap content hash of the weights (names, shapes, sums, a few values): edits change it."""
    h = hashlib.sha256()
    params = list(model.named_parameters())
    with torch.no_grad():
        for name, p in tqdm(params, desc="fingerprint", unit="tensor", disable=None, leave=False):
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat.sum(dtype=torch.float64).cpu().numpy().tobytes())  # no float64 copy
            h.update(flat[:: max(1, flat.numel() // 64)][:64].double().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def resolve_device(device: str) -> tuple[str | None, str | dict | None]:
    """(device to move to, device_map) for 'auto' | 'cpu' | 'cuda[:N]' | 'multi'."""
    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    if device == "multi":
        if torch.cuda.device_count() < 1:
            raise UserError("device 'multi' needs at least one CUDA GPU, none is visible", "use --device cpu")
        return None, "auto"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available", "use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or multi")
    return device, None


def resolve_dtype(dtype: str, device: str | None, config: Any) -> torch.dtype:
    """auto: float32 on CPU, the checkpoint's dtype on GPU.

    float32 on a CPU because bf16 matmuls are slow on CPUs without native bf16 and differ by CPU; on
    one with AVX512-BF16 or AMX, bfloat16 (asked for) runs a 0.5B model's passes 2.5-3.5x faster.
    """
    if dtype != "auto":
        return DTYPES[dtype]
    if device == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.bfloat16


def check_source(path: str | Path, download: bool = False) -> tuple[Path, str | None]:
    """Validate a model path or hub id; return (folder, gguf file name or None). Nothing is written."""
    path = resolve(path, download)
    if not path.exists():
        raise UserError(
            f"model path {path} does not exist",
            "pass a local Hugging Face model folder, a .gguf file, or a hub id such as org/name",
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf file", "pass a model folder or a .gguf file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file (no GGUF magic bytes)", REFETCH)
        if importlib.util.find_spec("gguf") is None:
            raise UserError("reading GGUF files needs the gguf package", "pip install gguf (or pip install '.[gguf]')")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} is not a model folder: it has no config.json",
            "pass a folder saved with save_pretrained (config.json, *.safetensors, tokenizer files)",
        )
    if not any(path.glob("*.safetensors")):
        raise UserError(
            f"{path} has no *.safetensors weights (pickled .bin weights are never loaded)",
            "convert the checkpoint to safetensors with save_pretrained(safe_serialization=True)",
        )
    check_files(path)
    return path, None


REFETCH = "the file is damaged, cut short or of another kind: copy, convert or download it again"
# Read by loading; transformers would skip a broken generation_config.json silently (and stop replies elsewhere).
JSON_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def check_files(folder: Path) -> None:
    """Every JSON file loading reads parses and every safetensors header covers its file (no weight is read)."""
    from safetensors import SafetensorError, safe_open

    for name in JSON_FILES:
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_bytes())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"{folder / name} is not readable JSON ({first_line(exc)})", REFETCH) from exc
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(f, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{f} is not a readable safetensors file ({first_line(exc)})", REFETCH) from exc


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else exc.__class__.__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_config(folder: Path, gguf_file: str | None, trust_remote_code: bool) -> Any:
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if gguf_file:  # transformers reports an unreadable GGUF as an invalid JSON config: not worth repeating
            why = first_line(exc) if isinstance(exc, ValueError) else "its metadata does not parse"
            raise UserError(f"could not read {folder / gguf_file} as GGUF ({why})", REFETCH) from exc
        if isinstance(exc, OSError):
            raise UserError(f"could not read {folder / 'config.json'} ({first_line(exc)})", REFETCH) from exc
        raw = _raw_model_type(folder)
        raise UserError(
            f"unsupported architecture {raw!r} in {folder} ({exc.__class__.__name__}); "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}",
            "use a supported model; models with custom code also need --trust-remote-code",
        ) from exc
    return config


def _raw_model_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("model_type", "unknown"))
    except (OSError, json.JSONDecodeError):
        return "unknown"


def load_tokenizer(
    folder: Path, gguf_file: str | None = None, chat_template: Path | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Tokenizer with a chat template and left padding (so batches end at the same position)."""
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the tokenizers library raises bare Exceptions for a file it cannot parse
        files = (gguf_file, "tokenizer.json", "tokenizer_config.json")
        named = [folder / f for f in files if f and (folder / f).is_file()]
        raise UserError(
            f"could not load a tokenizer from {named[0] if named else folder} ({first_line(exc)})",
            f"the folder needs readable tokenizer files; {REFETCH}",
        ) from exc
    if chat_template is not None:
        if not chat_template.is_file():
            raise UserError(f"chat template file {chat_template} does not exist", "check --chat-template")
        tok.chat_template = chat_template.read_text()
    if not tok.chat_template:
        raise UserError(
            f"the tokenizer in {folder} has no chat template",
            "pass --chat-template FILE with a Jinja chat template for this model",
        )
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def contiguous_head(model: PreTrainedModel) -> torch.utils.hooks.RemovableHandle | None:
    """Hand the vocabulary projection a contiguous input.

    A forward that keeps the last positions' logits only (`logits_to_keep`) projects a strided slice of
    the hidden states. Once the projection's weight is frozen (a LoRA wraps the model, rdo trains a
    direction alone), matmul no longer folds that slice into one matrix product: it copies the whole
    [vocab, hidden] weight once per row and runs a batched product. On a 150k-word bfloat16 model on a
    CPU that made first-token reads about five times slower (bench/frozen_head.py)."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    return head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else args)


def load(
    path: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    chat_template: Path | None = None,
    allow_unverified_arch: bool = False,
    quantize: str = "none",
    download: bool = False,
) -> Loaded:
    """Load model and tokenizer; the source is only read. quantize: one of QUANTIZE (bitsandbytes, CUDA).

    `path` is a folder, a .gguf file or a hub id (`org/name`, from the Hugging Face cache; fetched
    only with `download`). The Loaded's source is the local path the weights came from.
    """
    folder, gguf_file = check_source(path, download)
    config = load_config(folder, gguf_file, trust_remote_code)
    check_family(config, allow_unverified_arch)
    tok = load_tokenizer(folder, gguf_file, chat_template, trust_remote_code)
    target, device_map = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, config)
    extra = {}
    if quantize != "none":  # bitsandbytes places the weights itself: a device map, never a later .to()
        extra = {"quantization_config": quantization_config(quantize, torch_dtype, target)}
        device_map, target = device_map or {"": target}, None
    model = load_weights(folder, gguf_file, torch_dtype, device_map, trust_remote_code, **extra)
    if target is not None:
        model.to(target)
    model.eval()
    contiguous_head(model)
    source = folder / gguf_file if gguf_file else folder
    return Loaded(model, tok, source, gguf_file, allow_unverified_arch, quantize, trust_remote_code)


def load_weights(
    folder: Path, gguf_file: str | None, dtype: torch.dtype, device_map: Any, trust_remote_code: bool, **extra: Any
) -> PreTrainedModel:
    """The causal LM's weights, with a failure to read them named as one line."""
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=gguf_file,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if gguf_file else True,
            **extra,
        )
    except ValueError as exc:
        raise UserError(
            f"could not load {folder} as a causal language model: {first_line(exc)}",
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}",
        ) from exc
    except (SafetensorError, OSError) as exc:
        where = folder / gguf_file if gguf_file else folder
        raise UserError(f"could not read the weights in {where} ({first_line(exc)})", REFETCH) from exc


def quantization_config(quantize: str, compute: torch.dtype, target: str | None) -> Any:
    """bitsandbytes settings for 4-bit NF4 (QLoRA's) or 8-bit LLM.int8, computing in `compute`; a one-line
    error where they cannot run: no CUDA GPU, the model placed on the CPU (`target`), no bitsandbytes."""
    if quantize not in QUANTIZE[1:]:
        raise ValueError(f"quantize must be one of {QUANTIZE}, not {quantize!r}")
    if not torch.cuda.is_available():
        raise UserError(
            f"{quantize} loading (bitsandbytes) needs a CUDA GPU, and none is visible",
            f"drop --quantize {quantize} on this machine",
        )
    if target == "cpu":
        raise UserError(
            f"{quantize} loading (bitsandbytes) needs the model on a CUDA GPU, but the device is cpu",
            f"use --device cuda (or auto), or drop --quantize {quantize}",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"{quantize} loading needs the bitsandbytes package", "pip install '.[qlora]' (or pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def unquantized(loaded: Loaded, log: Callable[[str], None]) -> Loaded:
    """The same model with full-precision weights, for an edit that is saved; `loaded` itself when it is not quantized.

    bitsandbytes packs the weights (with per-block scales), so no projection can edit them and a
    dequantised copy would save the quantisation error as if it were the edit. The copy loads on the
    CPU in the checkpoint's dtype (the GPU holds the quantized model, and the full one may not fit
    there); the directions found on the quantized model are applied to it.
    """
    if loaded.quantize == "none":
        return loaded
    dtype = checkpoint_dtype(loaded.folder) or torch.float32
    log(
        f"  the edit is applied to {loaded.name}'s full-precision weights ({str(dtype).removeprefix('torch.')}, "
        f"loaded on the CPU) and saved unquantized; the {loaded.quantize} model only measured it"
    )
    model = load_weights(loaded.folder, loaded.gguf_file, dtype, None, loaded.trust_remote_code).eval()
    return Loaded(
        model, loaded.tokenizer, loaded.source, loaded.gguf_file, loaded.allow_unverified_arch, "none",
        loaded.trust_remote_code,
    )  # fmt: skip


def refuse_weight_edits(quantize: str, edits: Sequence[str], fix: str) -> None:
    """A one-line error where a command would edit the weights of a 4/8-bit model in place.

    Hooks on a bitsandbytes layer's output work (directional attacks, SABER's and Arditi's own
    measurements); a projection of its packed weights cannot, so these `edits` need the full model.
    """
    if quantize != "none" and edits:
        layers = f"{quantize} bitsandbytes layers"
        raise UserError(f"{' and '.join(edits)} would edit the weights in place, which {layers} do not allow", fix)


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    """The dtype the checkpoint was saved in, read from config.json (a loaded config reports the load dtype)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    text = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("dtype")
    return DTYPES.get(text) if isinstance(text, str) else None
