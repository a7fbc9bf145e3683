"""Zebra: MLA + Mamba2 hybrids composed from a pretrained Llama. Importing registers the Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from .cache import ZebraCache
from .config import ZebraConfig
from .kv import kv_bytes_per_token, kv_fraction, state_bytes_per_sequence
from .modeling import ZebraForCausalLM, ZebraModel

AutoConfig.register("zebra", ZebraConfig)
AutoModelForCausalLM.register(ZebraConfig, ZebraForCausalLM)

__all__ = [
    "ZebraCache",
    "ZebraConfig",
    "ZebraForCausalLM",
    "ZebraModel",
    "kv_bytes_per_token",
    "kv_fraction",
    "state_bytes_per_sequence",
]
