"""Reading Hugging Face modules: the adapters' converters only read attributes, so
`transformers` is not needed to import the adapters."""

from __future__ import annotations

from torch import nn


def load(target: nn.Module, source: nn.Module) -> None:
    target.load_state_dict(source.state_dict())


def hf_type(module: nn.Module) -> str:
    return type(module).__name__
