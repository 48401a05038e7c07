"""conv-onnx suite: tiny models of every builder arch, checked in onnxruntime and
onnxruntime-genai against transformers."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # for onnx_helpers (importlib import mode)
