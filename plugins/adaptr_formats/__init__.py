"""Built-in readers: Hugging Face safetensors model folders and PEFT LoRA adapter folders.

Registered through the ``adaptr`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from adaptr import hookimpl

from .hf_model import HFModelReader
from .peft_lora import PeftLoraReader


@hookimpl
def register_readers(register) -> None:
    register(HFModelReader())
    register(PeftLoraReader())
