import torch

from gptpipe.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"train.device is {name!r} but this machine has no usable CUDA GPU "
                                f"(torch.cuda.is_available() is False); set train.device to auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PipelineError(f"train.device is {name!r} but only {torch.cuda.device_count()} "
                                f"CUDA device(s) exist; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("train.device is 'mps' but MPS is not available here; set train.device to auto or cpu")
    return device
