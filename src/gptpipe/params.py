"""params.yaml, parsed once into typed, validated dataclasses.

Every key must be present (DVC tracks exactly what the file says, so a silent default
would be an untracked input). Values are checked here, with messages that name the key
and say what would be valid. This module imports neither torch nor tiktoken, so stages
that do not train (download, tokenize) start fast.
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from gptpipe.sources import is_sha256, parse_sources
from gptpipe.errors import PipelineError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
AUTO = "auto"
Auto = Literal["auto"]
SCRATCH = "scratch"
# The token ids the tokenize stage writes: GPT-2's, 0 .. 50256 (<|endoftext|>). A model may have
# more (padding, e.g. 50304 for speed), never fewer.
GPT2_VOCAB_SIZE = 50257
INT64_MAX = 2**63 - 1  # every integer param must fit in torch's int64; seeds are in [0, INT64_MAX]
MAX_LENGTH_PENALTY = 10.0  # beam search divides by new_tokens ** length_penalty: 10**30 ** 10 still fits a float


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise PipelineError(f"params: {key} {message}")


def per_process_batch(batch_size: int, processes: int) -> int:
    """train.batch_size is the global batch: each of `processes` takes an equal share of it."""
    if batch_size % processes:
        raise PipelineError(
            f"params: train.batch_size ({batch_size}) is the global batch, split evenly between "
            f"{processes} processes (train.nproc, or torchrun's --nproc_per_node × --nnodes): make "
            f"train.batch_size a multiple of {processes}, or change the number of processes")
    return batch_size // processes


@dataclass(frozen=True)
class GPTConfig:
    """The architecture of the GPT (gptpipe.model); the defaults are the book's 124M model."""
    vocab_size: int = 50257
    context_length: int = 256
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # GPT-2 ties the output head to the token embedding; the book keeps them separate.
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            require(getattr(self, key) >= 1, f"model.{key}", f"must be at least 1, got {getattr(self, key)}")
        require(self.emb_dim % self.n_heads == 0, f"model.n_heads ({self.n_heads})",
                f"must divide model.emb_dim ({self.emb_dim}); e.g. emb_dim 768 with n_heads 12")
        require(0.0 <= self.drop_rate < 1.0, "model.drop_rate", f"must be in [0, 1), got {self.drop_rate}")

    @property
    def n_parameters(self) -> int:
        """The parameter count of gptpipe.model.GPTModel with this config, without building it."""
        emb = self.emb_dim
        block = 12 * emb * emb + 10 * emb + (3 * emb if self.qkv_bias else 0)  # attention, feed-forward, 2 norms
        heads = 1 if self.tie_embeddings else 2  # token embedding, and the output head unless tied
        return heads * self.vocab_size * emb + self.context_length * emb + self.n_layers * block + 2 * emb


@dataclass(frozen=True)
class DataParams:
    url: Any  # a string, or a list of strings and {url:, sha256:} mappings (sources.parse_sources)
    val_url: Any  # null (val is drawn from url by the ratios), or the val split's sources, as url
    sha256: str | None
    max_bytes: int | None
    text_field: str
    bad_rows: Literal["error", "skip"]
    train_ratio: float
    test_ratio: float

    def __post_init__(self) -> None:
        require(bool(self.url), "data.url", "is empty: give an https/http/file URL, a local path or an "
                                            "hf://datasets/ path")
        try:
            parse_sources(self.url)
            if self.val_url is not None:
                parse_sources(self.val_url, "data.val_url")
        except PipelineError as e:
            raise PipelineError(f"params: {e}") from None
        require(bool(self.text_field), "data.text_field", "is empty: name the field of each Parquet or JSON-lines "
                                                          "row that holds its text (e.g. text)")
        require(self.sha256 is None or is_sha256(self.sha256),
                "data.sha256", f"must be 64 lowercase hex digits or null, got {self.sha256!r}")
        require(self.max_bytes is None or self.max_bytes >= 1, "data.max_bytes",
                f"must be null (no limit) or at least 1, got {self.max_bytes}")
        require(0.0 < self.train_ratio < 1.0, "data.train_ratio",
                f"must be between 0 and 1 (exclusive), got {self.train_ratio}")
        require(0.0 <= self.test_ratio < 1.0, "data.test_ratio",
                f"must be at least 0 (0: no test split) and below 1, got {self.test_ratio}")
        require(self.train_ratio + self.test_ratio < 1.0, "data.train_ratio + data.test_ratio",
                f"({self.train_ratio} + {self.test_ratio}) must be below 1 to leave text for the val "
                f"split; lower data.train_ratio or data.test_ratio")


@dataclass(frozen=True)
class ModelParams:
    """The model group: the architecture, and where the initial weights come from (scratch, or
    a checkpoint: weights.initial_model). An architecture key set to `auto` takes the
    checkpoint's value, or from scratch the book's (GPTConfig's default); a value written out
    must be the checkpoint's."""
    vocab_size: int | Auto
    context_length: int | Auto
    emb_dim: int | Auto
    n_heads: int | Auto
    n_layers: int | Auto
    drop_rate: float
    qkv_bias: bool | Auto
    tie_embeddings: bool | Auto
    init_from: str

    def __post_init__(self) -> None:
        require(self.vocab_size == AUTO or self.vocab_size >= GPT2_VOCAB_SIZE, "model.vocab_size",
                f"({self.vocab_size}) must be at least {GPT2_VOCAB_SIZE}, the number of GPT-2 token ids the "
                f"tokenize stage writes; use auto, {GPT2_VOCAB_SIZE}, or more for padding (e.g. 50304)")
        require(bool(self.init_from.strip()), "model.init_from",
                "is empty: use scratch, gpt2 (or gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face repo id, "
                "a model of this pipeline (data/model), a Hugging Face GPT-2 directory or a model.pth of the "
                "book's code")
        if self.init_from == SCRATCH:
            resolve_architecture(self)  # the whole architecture is known: check it now


def resolve_architecture(requested: "GPTConfig | ModelParams", checkpoint: dict[str, Any] | None = None) -> GPTConfig:
    """The architecture `requested`, each `auto` in it replaced by the checkpoint's value or,
    where there is none (from scratch, or the heads of the book's checkpoints), the book's."""
    checkpoint = checkpoint or {}
    values = {}
    for f in dataclasses.fields(GPTConfig):
        value = getattr(requested, f.name)
        values[f.name] = checkpoint.get(f.name, f.default) if value == AUTO else value
    return GPTConfig(**values)


@dataclass(frozen=True)
class TrainParams:
    batch_size: int
    stride: int
    lr: float
    weight_decay: float
    epochs: int
    eval_freq: int
    eval_iter: int
    seed: int
    device: str
    start_context: str
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool
    schedule: Literal["constant", "cosine"]
    warmup_steps: float
    initial_lr: float
    min_lr: float
    grad_clip: float | None
    grad_accum_steps: int
    max_steps: int | None
    checkpoint_every: int | None
    nproc: int

    def __post_init__(self) -> None:
        for key in ("batch_size", "stride", "eval_freq", "eval_iter", "grad_accum_steps", "nproc"):
            require(getattr(self, key) >= 1, f"train.{key}", f"must be at least 1, got {getattr(self, key)}")
        require(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.epochs >= 0, "train.epochs", f"must be >= 0, got {self.epochs}")
        require(DEVICE_PATTERN.fullmatch(self.device) is not None, "train.device",
                f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        require(self.warmup_steps >= 0 and (self.warmup_steps < 1 or self.warmup_steps.is_integer()),
                "train.warmup_steps", f"must be a whole number of steps or a fraction below 1 of all "
                f"steps, got {self.warmup_steps}")
        for key, meaning in (("initial_lr", "the warmup rises from it to train.lr"),
                             ("min_lr", "the cosine decays from train.lr to it")):
            value = getattr(self, key)
            require(0 <= value <= self.lr, f"train.{key}",
                    f"({value}) must be in [0, train.lr] = [0, {self.lr}]: {meaning}")
        require_seed(self.seed, "train.seed")
        require(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip",
                f"must be null (no clipping) or positive, got {self.grad_clip}")
        for key in ("max_steps", "checkpoint_every"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"train.{key}", f"must be null or at least 1, got {value}")
        per_process_batch(self.batch_size, self.nproc)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    max_tokens: int | None

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "evaluate.batch_size", f"must be at least 1, got {self.batch_size}")
        require(self.max_tokens is None or self.max_tokens >= 1, "evaluate.max_tokens",
                f"must be null (every window) or at least 1, got {self.max_tokens}")


@dataclass(frozen=True)
class SampleParams:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int
    num_samples: int
    num_beams: int
    length_penalty: float
    quantize: Literal["none", "int8"]

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 0, "sample.max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        require(self.temperature >= 0, "sample.temperature",
                f"must be >= 0 (0 means greedy), got {self.temperature}")
        require(self.top_k is None or self.top_k >= 1, "sample.top_k",
                f"must be null (no limit) or at least 1, got {self.top_k}")
        require(0.0 < self.top_p <= 1.0, "sample.top_p", f"must be in (0, 1] (1 turns it off), got {self.top_p}")
        require(self.num_samples >= 1, "sample.num_samples", f"must be at least 1, got {self.num_samples}")
        require(self.num_beams >= 1, "sample.num_beams", f"must be at least 1 (1 is no beam search), got {self.num_beams}")
        require(self.num_beams == 1 or self.temperature == 0, "sample.num_beams",
                f"({self.num_beams}) runs beam search, which is deterministic: set sample.temperature "
                f"to 0 (top_k and top_p are then unused), or num_beams to 1 to sample")
        require(-MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY, "sample.length_penalty",
                f"must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}] (1 is neutral; far beyond, the "
                f"length's power in the beam score overflows), got {self.length_penalty}")
        require_seed(self.seed, "sample.seed")


def require_seed(seed: int, key: str) -> None:
    """torch takes seeds in [-2**63, 2**64), numpy in [0, 2**32); a seed here is in [0, 2**63 - 1],
    so that seed + i (sample i, the distributed sampler's epoch i) stays in torch's range."""
    require(0 <= seed <= INT64_MAX, key,
            f"must be a whole number from 0 to 2**63 - 1 ({INT64_MAX}), got {seed}")


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    sample: SampleParams


class DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    would keep the last value, while DVC refuses the file."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in lines:
                raise DuplicateKeyError(problem=f"key {key!r} is given a second time (first on line "
                                                f"{lines[key]}), which DVC refuses: keep one of them",
                                        problem_mark=key_node.start_mark)
            if isinstance(key, typing.Hashable):
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise PipelineError(f"params file {path} not found: run from the project root or pass --params")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        fix = "" if isinstance(e, DuplicateKeyError) else "; fix the YAML there"
        raise PipelineError(f"{path}{where}: {e.problem or e.context}{fix}")
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {' '.join(str(e).split())}")
    if not isinstance(raw, dict):
        raise PipelineError(f"{path} must map stage groups to their keys, got {type(raw).__name__}")
    return parse_section(Params, "", raw)


def parse_section(cls: type, prefix: str, raw: Any) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and coercing each value to its type."""
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise PipelineError(f"params: {where} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PipelineError(f"params: unknown key {prefix}{unknown[0]} in {where}; "
                            f"valid keys are: {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise PipelineError(f"params: missing key {prefix}{missing[0]}; add it to params.yaml")
    values = {}
    for name in names:
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = parse_section(kind, f"{prefix}{name}.", raw[name])
        else:
            values[name] = coerce(f"{prefix}{name}", kind, raw[name])
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"params: {where}: {e}")


def coerce(key: str, kind: Any, value: Any) -> Any:
    """Check `value` against the annotated type. Floats may arrive as strings such as '1e-05'
    (what `dvc exp run -S` writes and PyYAML reads as text)."""
    if kind is Any:  # a value of several shapes, checked by its dataclass
        return value
    args = typing.get_args(kind)
    auto = Auto in args
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if (value is None and type(None) in args) or (auto and value == AUTO):
            return value
        (kind,) = [a for a in args if a not in (type(None), Auto)]
        args = typing.get_args(kind)
    if typing.get_origin(kind) is Literal:
        if value not in args:
            raise PipelineError(f"params: {key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > INT64_MAX:
            raise PipelineError(f"params: {key} is {value}, beyond a 64-bit integer (at most {INT64_MAX} "
                                f"either way); use a smaller value")
        return value
    if kind is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number: float | None = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        except ValueError:
            number = None
        if number is not None:
            require(math.isfinite(number), key, f"must be a finite number, got {value!r}")
            return number
    if kind is str and isinstance(value, str):
        return value
    raise PipelineError(f"params: {key} must be {kind.__name__}{' or auto' if auto else ''}, got {value!r} "
                        f"({type(value).__name__})")
