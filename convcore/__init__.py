"""convcore: convert and quantize ML models through plugins.

The public surface plugin authors and users rely on. Plugins import from here only.
"""
from .builtins.hf import (
    read_companions, read_json, read_tokenizer_files, write_companions, write_tokenizer_files,
)
from .extensions import Registrations, collect_registrations
from .hookspecs import hookimpl, hookspec
from .model import (
    DTYPES, FLOAT_DTYPES, ConvcoreError, Model, QuantizedTensor, TensorRef, arch_of, cast,
    cast_chunks, dtype_name, first_line, numpy_dtype, one_line, page_releaser, stack_tensors,
)
from .hub import is_hub_id, resolve as resolve_model
from .lora import adapter_info, lora_pairs
from .options import Option, parse_size
from .pipeline import convert, load, ordered_map, prepare, quantize
from .pooling import Pooling, is_encoder, pool, read_pooling
from .rowblocks import row_block_loaders
from . import hfconfig
from .multimodal import is_image_text, text_model
from .registry import CONTRACT, Format, Registry, Scheme, get_registry, using
from .runtime import Session
from .safetensors_io import (
    PlannedTensor, StreamingWriter, index_shards, inside_model, open_tensors, plan_shards, read_header, with_user_metadata,
    write_sharded,
)

__version__ = "0.1.0"

__all__ = [
    "DTYPES", "FLOAT_DTYPES", "ConvcoreError", "Format", "Model", "PlannedTensor",
    "CONTRACT", "QuantizedTensor", "Registrations", "Registry", "Scheme", "Session", "StreamingWriter", "TensorRef", "arch_of", "cast", "cast_chunks",
    "collect_registrations", "convert", "dtype_name", "get_registry", "hookimpl", "index_shards", "inside_model", "hookspec", "load", "numpy_dtype",
    "open_tensors", "Option", "ordered_map", "page_releaser", "parse_size", "plan_shards", "prepare", "quantize", "read_header", "read_json",
    "read_companions", "read_tokenizer_files", "write_companions", "using", "with_user_metadata", "write_sharded", "write_tokenizer_files",
    "Pooling", "is_encoder", "pool", "read_pooling", "stack_tensors", "hfconfig", "first_line", "one_line", "row_block_loaders", "is_image_text", "text_model",
    "adapter_info", "lora_pairs", "is_hub_id", "resolve_model",
]
