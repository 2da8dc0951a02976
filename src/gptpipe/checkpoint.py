"""The model a training run hands on: a Hugging Face GPT-2 directory, which this pipeline and
transformers' GPT2LMHeadModel.from_pretrained both load.

- model.safetensors: the weights under GPT2LMHeadModel's names. safetensors holds tensors and a
  header of strings, nothing executable, and loads by memory-mapping. A tied output head is
  stored once, as the token embedding (GPT-2 omits lm_head.weight); an untied one (the book's
  model) as lm_head.weight.
- config.json: GPT-2's config, and under "gptpipe" the GPTConfig and the run's progress (step,
  epoch, tokens seen). transformers keeps the extra entry as an attribute.

One file in two formats would cost a DVC experiment its weights twice; this layout is both, so
an experiment stores its weights once. The optimizer's moments and the RNG states are not here:
they are resume state (gptpipe.resume).

GPT-2 computes the same function as GPTModel. Its Conv1D layers store the transpose of an
nn.Linear weight (y = x @ W + b), and one c_attn matrix holds the query, key and value
projections side by side, always with a bias: a model without qkv bias stores zeros, which
compute the same as none.

This module also holds the one safe torch.load of the project, for the torch files it reads
(resume state, the book's checkpoints): weights_only=True, never arbitrary unpickling.
"""

import codecs
import dataclasses
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path, write_json, written_together
from gptpipe.model import GPTModel, uninitialized_weights
from gptpipe.params import GPTConfig, parse_section

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HEADER_KEY = "gptpipe"  # the config.json entry that marks a model of this pipeline
FORMAT_VERSION = 2  # 1: a single safetensors file under GPTModel's names (no longer read)
GPT2_END_OF_TEXT = 50256
# What file_kind finds: the two formats read here, by their first bytes.
SAFETENSORS = "a safetensors file"
TORCH_FILE = "a PyTorch file (torch.save)"
REWRITE = "re-run pretrain to write it again"

# Per block: (our name, Hugging Face's name). 2-D weights among them are Conv1D in GPT-2.
BLOCK_PARAMS = [
    ("norm1.weight", "ln_1.weight"), ("norm1.bias", "ln_1.bias"),
    ("att.out_proj.weight", "attn.c_proj.weight"), ("att.out_proj.bias", "attn.c_proj.bias"),
    ("norm2.weight", "ln_2.weight"), ("norm2.bias", "ln_2.bias"),
    ("ff.layers.0.weight", "mlp.c_fc.weight"), ("ff.layers.0.bias", "mlp.c_fc.bias"),
    ("ff.layers.2.weight", "mlp.c_proj.weight"), ("ff.layers.2.bias", "mlp.c_proj.bias"),
]
MODEL_PARAMS = [
    ("tok_emb.weight", "wte.weight"), ("pos_emb.weight", "wpe.weight"),
    ("final_norm.weight", "ln_f.weight"), ("final_norm.bias", "ln_f.bias"),
]
QKV = ("W_query", "W_key", "W_value")
# Buffers some GPT-2 checkpoints carry (the causal mask), not weights.
HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def save_model(directory: str | Path, model: GPTModel, **progress: int) -> None:
    """Write `model` as a Hugging Face GPT-2 directory, its config and `progress` (step=...,
    epoch=...) in config.json; both files land together."""
    directory = Path(directory)
    header = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(model.cfg), "progress": progress}
    with written_together():
        with atomic_path(directory / HF_WEIGHTS) as tmp:
            # One metadata entry, the one transformers asks for: safetensors writes several in a
            # random order (a Rust HashMap), so the same model would give other bytes, and DVC
            # another hash, from run to run.
            save_file(to_hf_state_dict(model.state_dict(), model.cfg), tmp, metadata={"format": "pt"})
        write_json(directory / HF_CONFIG, {**hf_config(model.cfg), HEADER_KEY: header})


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """GPT-2's config.json for `cfg`."""
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,  # GPT-2's original name, which llama.cpp's convert_hf_to_gguf.py reads
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
    }
    if cfg.vocab_size > GPT2_END_OF_TEXT:  # <|endoftext|> starts and ends GPT-2's documents
        config |= {"bos_token_id": GPT2_END_OF_TEXT, "eos_token_id": GPT2_END_OF_TEXT}
    return config


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict as GPT2LMHeadModel's: the inverse of from_hf_state_dict. Without qkv bias,
    c_attn gets a zero bias."""
    hf = {f"transformer.{theirs}": state[ours] for ours, theirs in MODEL_PARAMS}
    for i in range(cfg.n_layers):
        ours, theirs = f"trf_blocks.{i}.att.", f"transformer.h.{i}."
        hf[f"{theirs}attn.c_attn.weight"] = torch.cat([state[f"{ours}{n}.weight"] for n in QKV]).t()
        hf[f"{theirs}attn.c_attn.bias"] = (
            torch.cat([state[f"{ours}{n}.bias"] for n in QKV]) if cfg.qkv_bias
            else state[f"{ours}W_query.weight"].new_zeros(3 * cfg.emb_dim))
        for our_name, their_name in BLOCK_PARAMS:
            value = state[f"trf_blocks.{i}.{our_name}"]
            hf[theirs + their_name] = value.t() if value.ndim == 2 else value
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = state["out_head.weight"]
    return {key: value.detach().cpu().contiguous() for key, value in hf.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], n_layers: int, tied: bool,
                       source: str) -> dict[str, torch.Tensor]:
    """Rename a GPT2LMHeadModel or GPT2Model state dict to ours, splitting c_attn into query,
    key and value and transposing the Conv1D weights (views: no copy). `source` names the
    file in messages."""
    hf = {key.removeprefix("transformer."): value for key, value in hf_state.items()
          if not key.endswith(HF_BUFFER_SUFFIXES)}

    def take(key: str) -> torch.Tensor:
        try:
            return hf.pop(key)
        except KeyError:
            raise PipelineError(f"{source} lacks the GPT-2 weight {key!r} (its config.json promises "
                                f"{n_layers} layers)") from None

    state = {ours: take(theirs) for ours, theirs in MODEL_PARAMS}
    for i in range(n_layers):
        ours, theirs = f"trf_blocks.{i}.", f"h.{i}."
        # c_attn: (emb, 3 * emb) as Conv1D -> three nn.Linear weights of (emb, emb)
        for name, weight in zip(QKV, take(f"{theirs}attn.c_attn.weight").t().chunk(3)):
            state[f"{ours}att.{name}.weight"] = weight
        for name, bias in zip(QKV, take(f"{theirs}attn.c_attn.bias").chunk(3)):
            state[f"{ours}att.{name}.bias"] = bias
        for our_name, their_name in BLOCK_PARAMS:
            value = take(theirs + their_name)
            state[ours + our_name] = value.t() if value.ndim == 2 else value
    lm_head = hf.pop("lm_head.weight", None)
    if tied:
        state["out_head.weight"] = state["tok_emb.weight"]
    elif lm_head is None:
        raise PipelineError(f"{source} lacks 'lm_head.weight', which an untied model "
                            f"(tie_word_embeddings: false) needs")
    else:
        state["out_head.weight"] = lm_head
    if hf:
        raise PipelineError(f"{source} holds weights its config.json does not account for: "
                            f"{', '.join(sorted(hf)[:5])}")
    return state


def file_kind(path: Path) -> str:
    """What `path` holds, judged by its first bytes: SAFETENSORS (an 8-byte header length, then
    JSON), TORCH_FILE (a zip archive or a pickle), or a description of anything else."""
    if path.is_dir():
        return "a directory"
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30:
        return SAFETENSORS
    if head.startswith(b"PK\x03\x04") or len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return TORCH_FILE  # a zip archive, or a pickle (protocol 2 to 5)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character may be cut at byte 64
    except UnicodeDecodeError:
        return "a file of an unknown format"
    return "a text file" if all(c.isprintable() or c.isspace() for c in text) else "a file of an unknown format"


def require_usable_weights(state: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """Every weight a floating-point tensor of finite numbers: a NaN would only show as NaN logits."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise PipelineError(f"{source}: weight {key} holds {value.dtype} values, not floating point; {fix}")
        # A NaN or an infinity makes the sum non-finite, so a finite sum settles it in one pass
        # with no temporary (30x faster on 650 MB); only a non-finite sum (or huge finite values
        # that overflow it) is checked element by element.
        if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
            raise PipelineError(f"{source}: weight {key} holds NaN or infinite values (a diverged or "
                                f"damaged model); {fix}")


def is_model_directory(path: Path) -> bool:
    """Whether `path` is a directory whose config.json marks a model of this pipeline."""
    try:
        return HEADER_KEY in json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def read_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The config, the weights (by GPTModel's names, the tied head included) and the progress
    of a model directory of this pipeline."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"model {path} not found: run the pretrain stage first (dvc repro pretrain)")
    if not path.is_dir():
        raise PipelineError(f"{path} is {file_kind(path)}, not a model of this pipeline (a directory of "
                            f"{HF_CONFIG} and {HF_WEIGHTS}); re-run pretrain to write it, or give the path of one")
    config_path, weights = path / HF_CONFIG, path / HF_WEIGHTS
    for part in (config_path, weights):
        if not part.exists():
            raise PipelineError(f"{part} not found: {path} is not a whole model of this pipeline; {REWRITE}")
    try:
        header = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{config_path} is not valid JSON ({e}); {REWRITE}") from e
    if not isinstance(header, dict) or HEADER_KEY not in header:
        raise PipelineError(f"{config_path} has no '{HEADER_KEY}' entry: {path} is not a model of this "
                            f"pipeline (a Hugging Face GPT-2 directory can be model.init_from)")
    try:
        header = header[HEADER_KEY]
        if header["format_version"] != FORMAT_VERSION:
            raise PipelineError(f"format version {header['format_version']}, this version reads {FORMAT_VERSION}")
        config = parse_section(GPTConfig, "model.", header["config"])
    except (KeyError, TypeError, PipelineError) as e:
        raise PipelineError(f"{config_path} has a model header this version cannot read "
                            f"({str(e).removeprefix('params: ')}); {REWRITE}") from e
    if (kind := file_kind(weights)) != SAFETENSORS:
        raise PipelineError(f"{weights} is {kind}, not a safetensors file; {REWRITE}")
    try:
        with safe_open(weights, framework="pt", device=str(device)) as f:
            hf_state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"{weights} is not a readable safetensors file ({e}); {REWRITE}") from e
    require_usable_weights(hf_state, str(weights), REWRITE)
    try:
        state = from_hf_state_dict(hf_state, config.n_layers, config.tie_embeddings, str(weights))
    except PipelineError as e:
        raise PipelineError(f"{e}; {REWRITE}") from e
    if not config.qkv_bias:
        biases = [state.pop(f"trf_blocks.{i}.att.{name}.bias") for i in range(config.n_layers) for name in QKV]
        if any(bias.any() for bias in biases):
            raise PipelineError(f"{weights} holds query/key/value biases that are not zero, though its "
                                f"config says qkv_bias: false; {REWRITE}")
    # transposed views, copied once here so that every layer computes on contiguous weights
    return config, {key: value.contiguous() for key, value in state.items()}, header.get("progress", {})


def load_model(path: str | Path, device: torch.device) -> tuple[GPTModel, dict[str, Any]]:
    """The model of a model directory, on `device`, in eval mode; and its progress counters."""
    config, state, progress = read_model(path, device)
    with uninitialized_weights():
        model = GPTModel(config)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise PipelineError(f"the weights in {path} do not fit the model config stored with them "
                            f"({str(e).splitlines()[0]} ...); the file was altered or mixed from two "
                            f"runs: re-run pretrain") from e
    if config.tie_embeddings:  # assign=True replaced the shared Parameter with two
        model.out_head.weight = model.tok_emb.weight
    return model.to(device).eval(), progress


def torch_load(path: Path, what: str, fix: str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: plain tensors and values, never code. `what` names the
    file for the error message, `fix` says what to do about an unreadable one."""
    if not path.exists():
        raise PipelineError(f"{what} {path} not found; {fix}")
    if (kind := file_kind(path)) != TORCH_FILE:
        raise PipelineError(f"{what} {path} is {kind}, not a PyTorch file (torch.save); {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on to advise turning the check off; keep only what it found
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise PipelineError(f"{what} {path} holds objects other than tensors and plain values "
                            f"({found.group(1) if found else 'a pickled object'}), which are refused for "
                            f"safety: loading them could run code; {fix}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise PipelineError(f"{what} {path} is not a readable PyTorch file (truncated or another "
                            f"format?): {str(e).splitlines()[0] if str(e) else type(e).__name__}; {fix}") from e
