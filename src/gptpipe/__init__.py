"""gptpipe: pretrain a GPT-2-style language model from scratch, one library under a DVC pipeline."""

from gptpipe.errors import PipelineError

__all__ = ["PipelineError"]
