"""convcore plugin ``parquet``: Hugging Face <-> Parquet weight tables (schemas V1 / V2).

One row per tensor (a tensor over ``chunk_size`` as several rows, in order) and one row
group per row, so query engines (duckdb, polars, Spark, pyarrow.dataset) read the file
as a plain table and a reader fetches one tensor without touching the others. V1 stores
float tensors as their bytes; V2 (``--quant``) adds quantized rows in the per-row and
affine schemes of quant-rowwise, used by name through the core. Column meanings:
:mod:`conv_parquet.schema`; what the key-value metadata holds: :mod:`conv_parquet.kv`;
reading without convcore's pipeline: :class:`WeightLoader`.

Writer options (``-O KEY=VALUE``): ``split_max_size`` (a directory of
``part-00000.parquet`` files, as Spark names them), ``chunk_size`` (a larger tensor
becomes several rows), ``compression``, ``compression_level``, ``row_search`` (how the
per-row schemes pick scales), ``threads`` (rows made and compressed at once), ``dry_run``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from convcore import ConvcoreError, Format, Model, Option, hookimpl

from .loader import WeightLoader
from .reader import load_parquet
from .schema import MAGIC
from .validate import validate_parquet
from .writer import write_parquet

__all__ = ["SCHEMES", "WeightLoader", "detect", "load_parquet", "validate_parquet", "write_parquet"]

ROW_SCHEMES = ("int8-row", "int8-row-sym", "int8-tensor", "int4-row", "int2-row", "int1-row")
AFFINE_SCHEMES = tuple(f"int{b}-g{g}" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))
SCHEMES = ROW_SCHEMES + AFFINE_SCHEMES

OPTIONS = (
    Option("split_max_size", "size", None,
           "write a directory of part-NNNNN.parquet files of at most this size (e.g. 2G)"),
    Option("chunk_size", "size", 16 << 20,
           "store a tensor larger than this as several rows (chunks) of about this size; at most 2G"),
    Option("compression", "choice", "zstd", "codec of every column",
           choices=("zstd", "snappy", "lz4", "gzip", "brotli", "none")),
    Option("compression_level", "int", None, "the codec's level (pyarrow's default when unset)"),
    Option("row_search", "choice", "mse", "int{1,2,4,8}-row scales: least squares (mse) or min/max",
           choices=("mse", "minmax")),
    Option("threads", "int", None,
           "threads that make and compress rows (default: the CPUs, at most 4; each holds a few chunks)"),
    Option("dry_run", "bool", False, "print each tensor's part, name, stored type and shape; write nothing"),
)


def _starts_as_parquet(file: Path) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def detect(path: Path) -> int:
    """30 for a file starting with Parquet's magic bytes (a truncated one too, so loading
    says what is wrong with it) or a directory of ``*.parquet`` files (Spark's
    ``part-*.parquet`` layout); 0 otherwise."""
    path = Path(path)
    if path.is_file():
        return 30 if _starts_as_parquet(path) else 0
    if path.is_dir():
        parts = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        if parts and _starts_as_parquet(parts[0]):
            return 30
    return 0


@hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(Format(name="parquet", description="Parquet weight table, one row per tensor (schemas V1/V2)",
                    directory=False, extensions=(".parquet",), schemes=SCHEMES,
                    scheme_package="quant-rowwise", detect=detect, options=OPTIONS,
                    outputs=("part-*.parquet",)))


@hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt != "parquet":
        return None
    return load_parquet(Path(path))


@hookimpl(tryfirst=True)
def convcore_write(model: Model, path: Path, fmt: str, options: dict[str, Any],
                   progress: Callable[[str], None]) -> Path | None:
    if fmt == "parquet":
        return write_parquet(model, Path(path), options, progress)
    if model.format == "parquet" and not model.config:
        # a plain V1/V2 file (as other tools write them) has weights only; say so before
        # the target writes a model nothing can load
        raise ConvcoreError(f"{model.source}: has no config.json in its metadata, and format {fmt} "
                            "needs the model's config: put config.json (and the tokenizer files) "
                            "beside it, or convert to parquet")
    return None


@hookimpl
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    if fmt != "parquet":
        return None
    return validate_parquet(Path(path))


@hookimpl
def convcore_open_session(path: Path, fmt: str, options: dict[str, Any]) -> Any:
    if fmt != "parquet":
        return None
    from .runtime import ParquetSession
    return ParquetSession(Path(path), options)
