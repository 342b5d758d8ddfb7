"""Checkpoint readers: tensors by Hugging Face name, decoded lazily, one at a time."""

from swtool.checkpoint.directory import Checkpoint, open_checkpoint
from swtool.checkpoint.safetensors import DeferredTensor, SafetensorsFile, TensorInfo, write_safetensors

__all__ = ["DeferredTensor", "Checkpoint", "open_checkpoint", "SafetensorsFile", "TensorInfo", "write_safetensors"]
