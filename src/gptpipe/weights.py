"""Model weights in and out.

In: the initial weights of pretraining, `model.init_from`: `scratch`, a model of this
pipeline (data/model, e.g. an earlier experiment's), a Hugging Face GPT-2
directory (config.json + model.safetensors, the layout of openai-community/gpt2), a
checkpoint written by the book's code (model.pth, a GPTModel state dict, or
model_and_optimizer.pth), or, where no such local path exists, a GPT-2 on the Hugging Face
Hub (gptpipe.hub: gpt2, gpt2-medium, ..., org/name[@revision]). The architecture is read from
the checkpoint: the params' `auto` keys take its values, and the keys written out must equal
them, except that the context may be shorter: the model then keeps the first position
embeddings, and computes on such short sequences exactly what the checkpoint computes (as
nanoGPT's crop_block_size).

Out: nothing to do. The model pretrain writes is a Hugging Face GPT-2 directory already
(gptpipe.checkpoint), which transformers' GPT2LMHeadModel.from_pretrained loads.
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptpipe.checkpoint import (HF_CONFIG, HF_WEIGHTS, SAFETENSORS, TORCH_FILE, file_kind, from_hf_state_dict,
                                is_model_directory, read_model, require_usable_weights, torch_load)
from gptpipe.errors import PipelineError
from gptpipe.hub import download, parse_hub_id
from gptpipe.model import GPTModel, from_book_state_dict
from gptpipe.params import AUTO, SCRATCH, GPTConfig, ModelParams, resolve_architecture

log = logging.getLogger(__name__)

# GPT2Config's defaults, for config.json files that leave a key out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "tie_word_embeddings": True,
}
# Options of a GPT-2 config.json under which it computes what GPTModel computes (the first
# value is GPT2Config's default). Any other value would give different logits.
SUPPORTED_HF_OPTIONS: dict[str, tuple[Any, ...]] = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # GELU, tanh approximation
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}
ACCEPTED = ("scratch, gpt2 (or gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face repo id "
            "(org/name[@revision]), a model of this pipeline (data/model), a Hugging Face GPT-2 "
            "directory (config.json + model.safetensors) or a checkpoint of the book's code "
            "(model.pth or model_and_optimizer.pth)")


def initial_model(requested: GPTConfig | ModelParams, init_from: str) -> GPTModel:
    """A GPTModel of the architecture `requested`, freshly initialised (`scratch`) or holding
    the weights at `init_from`.

    Each `auto` key of `requested` takes the checkpoint's value; a key written out must equal
    it (the context may be shorter), else a PipelineError lists each difference. The random
    initialisation runs either way, so a loaded model sees the same batch order and dropout
    masks as a run from scratch with the same seed.
    """
    if init_from == SCRATCH:
        return GPTModel(resolve_architecture(requested))
    found, state = read_weights(checkpoint_path(init_from))
    require_same_architecture(found, requested, init_from)
    cfg = resolve_architecture(requested, found)
    if "n_heads" not in found:
        # The number of heads leaves no trace in the shapes of the book's weights.
        log.info(f"{init_from}: the number of attention heads cannot be read from the weights; using "
                 f"n_heads={cfg.n_heads}, which must be the value the model was trained with (model.n_heads)")
    if cfg.context_length < found["context_length"]:
        log.info(f"keeping the first {cfg.context_length} of the checkpoint's "
                 f"{found['context_length']} position embeddings (model.context_length)")
        state["pos_emb.weight"] = state["pos_emb.weight"][:cfg.context_length]
    require_usable_weights(state, f"model.init_from={init_from}", f"expected {ACCEPTED}")
    model = GPTModel(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes inside the checkpoint that contradict its own architecture
        raise PipelineError(f"model.init_from: the weights in {init_from} do not fit the architecture they "
                            f"describe ({str(e).splitlines()[-1].strip()}); expected {ACCEPTED}") from e
    log.info(f"initial weights from {init_from}")
    return model


def checkpoint_path(init_from: str) -> Path:
    """The local path `init_from` names; else the snapshot folder of the Hugging Face Hub
    checkpoint it names, downloaded unless it is in the cache."""
    path = Path(init_from)
    if path.exists():
        return path
    checkpoint = parse_hub_id(init_from)
    if checkpoint is None:
        raise PipelineError(f"model.init_from: {path} does not exist; give {ACCEPTED}")
    return download(checkpoint, (HF_CONFIG, HF_WEIGHTS), init_from)


def read_weights(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The architecture (GPTConfig fields) a checkpoint determines, and its weights under our names."""
    if not path.exists():
        raise PipelineError(f"model.init_from: {path} does not exist; give {ACCEPTED}")
    if path.name == HF_WEIGHTS and (path.parent / HF_CONFIG).is_file():
        path = path.parent  # the weights of a model directory: the directory
    if path.is_dir():
        if is_model_directory(path):  # this pipeline's: its own config (qkv bias, context) is the truth
            config, state, _ = read_model(path)
            return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "drop_rate"}, state
        if not (path / HF_CONFIG).is_file():
            raise PipelineError(f"model.init_from: directory {path} has no {HF_CONFIG}; expected {ACCEPTED}")
        return read_hf_gpt2(path)
    kind = file_kind(path)  # by content: a renamed file is still read as what it is
    if kind == TORCH_FILE:
        return read_book_checkpoint(path)
    if kind == SAFETENSORS:
        raise PipelineError(f"model.init_from: {path} is a safetensors file without the {HF_CONFIG} that "
                            f"describes its architecture; give the directory holding both")
    raise PipelineError(f"model.init_from: {path} is {kind}, not a checkpoint; expected {ACCEPTED}")


# ---------------------------------------------------------------- Hugging Face GPT-2

def read_hf_gpt2(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = read_hf_config(directory / HF_CONFIG)
    weights = directory / HF_WEIGHTS
    if not weights.is_file():
        raise PipelineError(f"model.init_from: {directory} has no {HF_WEIGHTS}; download the "
                            f"safetensors file (a pytorch_model.bin is not read: unpickling it "
                            f"could run code)")
    if (kind := file_kind(weights)) != SAFETENSORS:
        raise PipelineError(f"model.init_from: {weights} is {kind}, not a safetensors file")
    try:
        hf_state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"model.init_from: {weights} is not a readable safetensors file: {e}") from e
    found = {
        "vocab_size": config["vocab_size"],
        "context_length": config["n_positions"],
        "emb_dim": config["n_embd"],
        "n_heads": config["n_head"],
        "n_layers": config["n_layer"],
        "qkv_bias": True,  # GPT-2's c_attn always has a bias
        "tie_embeddings": config["tie_word_embeddings"],
    }
    return found, from_hf_state_dict(hf_state, found["n_layers"], found["tie_embeddings"],
                                     f"model.init_from: {weights}")


def read_hf_config(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"model.init_from: {path} is not valid JSON: {e}") from e
    if not isinstance(found, dict):
        raise PipelineError(f"model.init_from: {path} holds a JSON {type(found).__name__}, not the mapping "
                            f"of a Hugging Face config.json")
    config = {**HF_DEFAULTS, **found}
    wrong = [key for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
             if type(config[key]) is not int or config[key] < 1]
    if wrong or not isinstance(config["tie_word_embeddings"], bool):
        key = wrong[0] if wrong else "tie_word_embeddings"
        raise PipelineError(f"model.init_from: {path} sets {key} to {config[key]!r}, which is not a "
                            f"{'positive whole number' if wrong else 'boolean'}")
    if config.get("model_type") != "gpt2":
        raise PipelineError(f"model.init_from: {path} describes a {config.get('model_type')!r} model; "
                            f"only GPT-2 (model_type gpt2) has the architecture of this pipeline's GPT")
    unsupported = {key: config.get(key, allowed[0]) for key, allowed in SUPPORTED_HF_OPTIONS.items()
                   if config.get(key, allowed[0]) not in allowed}
    if config["n_inner"] not in (None, 4 * config["n_embd"]):
        unsupported["n_inner"] = config["n_inner"]
    if unsupported:
        raise PipelineError(f"model.init_from: {path} sets {unsupported}, which this pipeline's GPT "
                            f"does not implement (it supports {SUPPORTED_HF_OPTIONS} and n_inner "
                            f"null or 4 * n_embd)")
    return config


# ---------------------------------------------------------------- the book's checkpoints

def read_book_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """model.pth (torch.save(model.state_dict())) or model_and_optimizer.pth
    ({"model_state_dict", "optimizer_state_dict"}) of the book's GPTModel. Its number of heads
    is not in the weights, so not in the architecture returned."""
    loaded = torch_load(path, "model.init_from:", f"expected {ACCEPTED}")
    if isinstance(loaded, dict) and "model_state_dict" in loaded:
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, dict) or "tok_emb.weight" not in loaded:
        raise PipelineError(f"model.init_from: {path} is not a checkpoint of the book's GPTModel "
                            f"(no 'tok_emb.weight'); expected {ACCEPTED}")
    state = from_book_state_dict(loaded)
    if not all(isinstance(value, torch.Tensor) for value in state.values()) or state["tok_emb.weight"].ndim != 2 \
            or state.get("pos_emb.weight", torch.zeros(0)).ndim != 2:
        raise PipelineError(f"model.init_from: {path} holds a 'tok_emb.weight' but not the tensors of the book's "
                            f"GPTModel (each a tensor, the embeddings two-dimensional); expected {ACCEPTED}")
    vocab_size, emb_dim = state["tok_emb.weight"].shape
    found = {
        "vocab_size": vocab_size,
        "context_length": state["pos_emb.weight"].shape[0],
        "emb_dim": emb_dim,
        "n_layers": len({key.split(".")[1] for key in state if key.startswith("trf_blocks.")}),
        "qkv_bias": "trf_blocks.0.att.W_query.bias" in state,
        "tie_embeddings": False,  # the book's GPTModel has its own out_head
    }
    return found, state


def require_same_architecture(found: dict[str, Any], requested: GPTConfig | ModelParams, source: str) -> None:
    asked = {key: getattr(requested, key) for key in found}
    differing = {key: value for key, value in found.items() if asked[key] not in (AUTO, value)
                 and not (key == "context_length" and asked[key] < value)}
    if not differing:
        return
    listed = "; ".join(f"model.{key} is {yaml_value(asked[key])} in the params, "
                       f"{yaml_value(value)} in the checkpoint"
                       + (" (or less)" if key == "context_length" else "")
                       for key, value in differing.items())
    settings = " ".join(f"-S model.{key}={yaml_value(value)}" for key, value in differing.items())
    raise PipelineError(f"model.init_from={source} holds another architecture than the params "
                        f"describe: {listed}. Set model.* to auto (the checkpoint's values) or to the "
                        f"checkpoint's values, e.g. dvc exp run {settings}")


def yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
