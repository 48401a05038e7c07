"""The parquet format's runtime: the file materialised as a temporary HF directory and
run in transformers through the hf format's own session (the ``[infer]`` extra)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from convcore import ConvcoreError, Session, convert, get_registry


class ParquetSession(Session):
    """A weight file converted once to HF in a temporary directory, then served by the
    hf session; the directory is removed on :meth:`close`."""

    def __init__(self, path: Path, options: dict[str, Any]):
        self._tmp: Path | None = Path(tempfile.mkdtemp(prefix="convcore-parquet-"))
        self._inner: Session | None = None
        try:
            hf = convert(path, self._tmp / "hf", to="hf", from_="parquet")
            self._inner = get_registry().open_session(hf, "hf", options)
        except BaseException:
            self.close()
            raise
        self.vocab_size = self._inner.vocab_size
        self.stop_ids = self._inner.stop_ids

    def _session(self) -> Session:
        if self._inner is None:
            raise ConvcoreError("the parquet session is closed")
        return self._inner

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._session().logits(token_ids)

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._session().decode(token_ids)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
