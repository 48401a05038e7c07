"""The onnx format's runtime: an ONNX Runtime session on ``model.onnx`` that keeps the
present key/values of one sequence and feeds them back as the past (the ``[infer]``
extra)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convcore import ConvcoreError, Session, first_line

from .reader import model_file

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}




def _stop_ids(root: Path) -> tuple[int, ...]:
    ids: set[int] = set()
    for name, keys in (("genai_config.json", ("model", "eos_token_id")),
                       ("generation_config.json", ("eos_token_id",)), ("config.json", ("eos_token_id",))):
        try:
            value: Any = json.loads((root / name).read_text())
            for key in keys:
                value = value.get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, list) else [value]))
        if ids:
            break
    return tuple(sorted(ids))


def ort_session(file: Path, options: dict[str, Any], graph: Any = None) -> Any:
    """An onnxruntime CPU session on ``file``: quiet unless ``verbose``, ``threads`` intra-op."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConvcoreError("onnx inference needs onnxruntime (pip install 'conv-onnx[infer]')") from None
    so = ort.SessionOptions()
    so.log_severity_level = 0 if options.get("verbose") else 3
    if options.get("threads"):
        so.intra_op_num_threads = int(options["threads"])
    try:
        model: Any = str(file)
        stripped = _without_value_info(graph if graph is not None else _graph(file))
        if stripped is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(file.parent))
            model = stripped
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ConvcoreError(f"{file}: onnxruntime cannot load it: {first_line(exc)}") from None


def _graph(file: Path) -> Any:
    """The ONNX model at ``file`` without its weights, or None where onnx cannot read it
    (onnxruntime then says what is wrong when it loads the file)."""
    import onnx
    try:
        return onnx.load(str(file), load_external_data=False)
    except Exception:  # noqa: BLE001 - reported by onnxruntime
        return None


def _without_value_info(model: Any) -> bytes | None:
    """``model`` serialized without its intermediate shape annotations, where it has them
    (None otherwise). onnxruntime-genai's builder labels some of its fp16 graph's tensors
    with the wrong symbolic length (a key after the cache is joined as
    ``sequence_length``), and onnxruntime's CPU casts then refuse the second run of a
    session (decoding after the prompt): the shapes are inferred again without them."""
    if model is None or not model.graph.value_info:
        return None
    del model.graph.value_info[:]
    return model.SerializeToString()


#: positions a shared KV buffer is made with beyond the tokens it must hold now, so
#: decoding does not copy it at every step
SHARED_HEADROOM = 256


def _shared_window(model: Any) -> int:
    """The largest sliding window of the graph's GroupQueryAttention nodes that keep
    their cache in a shared buffer (``sliding_window_cache``: the past must come in with
    room for the window), or 0."""
    import onnx
    window = 0
    for node in model.graph.node if model is not None else ():
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("sliding_window_cache"):
                window = max(window, int(attrs.get("local_window_size", 0)))
    return window


class OnnxSession(Session):
    """A decoder graph (builder or export path) in onnxruntime; logits in float32."""

    def __init__(self, path: Path, options: dict[str, Any]):
        self.file = model_file(Path(path))
        graph = _graph(self.file)  # read once: the shared-cache window, then the session
        self.window = _shared_window(graph)
        self.sess = ort_session(self.file, options, graph)
        inputs = {i.name: i for i in self.sess.get_inputs()}
        if "input_ids" not in inputs or "logits" not in {o.name for o in self.sess.get_outputs()}:
            raise ConvcoreError(f"{self.file}: not a decoder graph (needs input_ids in, logits out)")
        self.past_names = sorted((n for n in inputs if PAST.match(n)),
                                 key=lambda n: (int(PAST.match(n).group(1)), n))
        self.past_shape: dict[str, list[Any]] = {n: inputs[n].shape for n in self.past_names}
        self.kv_dtype = NUMPY.get(inputs[self.past_names[0]].type, np.float32) if self.past_names else np.float32
        self.position_ids = "position_ids" in inputs
        self.has_mask = "attention_mask" in inputs
        self.outputs = [o.name for o in self.sess.get_outputs()]
        logits = next(o for o in self.sess.get_outputs() if o.name == "logits")
        last = logits.shape[-1]
        self.vocab_size = int(last) if isinstance(last, int) else 0
        self.stop_ids = _stop_ids(self.file.parent)
        self._past: dict[str, np.ndarray] | None = None
        self._length = 0

    def _room(self, past: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
        """``past`` as buffers of at least ``total`` positions (and the sliding window)
        where the graph's attention keeps its cache in one shared buffer (onnxruntime-genai's
        builder with sliding-window layers: GroupQueryAttention's sliding_window_cache),
        the positions held so far copied over; else ``past`` as it is."""
        if not self.window:
            return past
        out = {}
        for name, array in past.items():
            if array.shape[2] >= total:
                out[name] = array
                continue
            room = np.zeros((*array.shape[:2], max(self.window, total + SHARED_HEADROOM), array.shape[3]),
                            array.dtype)
            room[:, :, :self._length] = array[:, :, :self._length]
            out[name] = room
        return out

    def _empty_past(self) -> dict[str, np.ndarray]:
        out = {}
        try:  # symbolic axes (onnxruntime-genai's builder names head_dim kv_cache_dim)
            dec = json.loads((self.file.parent / "genai_config.json").read_text())["model"]["decoder"]
        except (OSError, ValueError, KeyError, TypeError):
            dec = {}
        for name in self.past_names:
            _, heads, _, dim = self.past_shape[name]
            heads = heads if isinstance(heads, int) else dec.get("num_key_value_heads")
            dim = dim if isinstance(dim, int) else dec.get("head_size")
            if not isinstance(heads, int) or not isinstance(dim, int):
                raise ConvcoreError(f"{self.file}: {name} needs fixed head and head_dim axes")
            out[name] = np.zeros((1, heads, 0, dim), self.kv_dtype)
        return out

    def _run(self, ids: list[int], past: dict[str, np.ndarray], start: int) -> np.ndarray:
        total = start + len(ids)
        feed: dict[str, np.ndarray] = {"input_ids": np.array([ids], np.int64), **self._room(past, total)}
        if self.has_mask:
            feed["attention_mask"] = np.ones((1, total), np.int64)
        if self.position_ids:
            feed["position_ids"] = np.arange(start, total, dtype=np.int64)[None]
        try:
            results = self.sess.run(None, feed)
        except Exception as exc:
            raise ConvcoreError(f"{self.file}: onnxruntime run failed: {first_line(exc)}") from None
        named = dict(zip(self.outputs, results))
        self._past = {n: named[n.replace("past_key_values", "present")] for n in self.past_names}
        self._length = total
        return np.asarray(named["logits"][0], dtype=np.float32)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self.check_ids(token_ids)
        self._length = 0
        return self._run(ids, self._empty_past(), 0)

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        if self._past is None:
            raise ConvcoreError("decode() before logits(): nothing to continue")
        return self._run(self.check_ids(token_ids), self._past, self._length)

    def close(self) -> None:
        self._past = None
        self.sess = None


class OnnxEncoderSession(Session):
    """An encoder graph (export path: ``last_hidden_state`` out) in onnxruntime;
    embeddings pooled as the directory's sentence-transformers files say."""

    kind = "encoder"

    def __init__(self, path: Path, options: dict[str, Any]):
        from convcore import read_pooling
        self.file = model_file(Path(path))
        self.sess = ort_session(self.file, options)
        self.inputs = {i.name for i in self.sess.get_inputs()}
        self.pooling = read_pooling(self.file.parent)
        try:
            config = json.loads((self.file.parent / "config.json").read_text())
            self.vocab_size = int(config.get("vocab_size") or 0)
        except (OSError, ValueError):
            self.vocab_size = 0

    def hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.array([self.check_ids(token_ids)], np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones_like(ids)
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        try:
            out = self.sess.run(["last_hidden_state"], feed)[0]
        except Exception as exc:
            raise ConvcoreError(f"{self.file}: onnxruntime run failed: {first_line(exc)}") from None
        return np.asarray(out[0], dtype=np.float32)

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        from convcore import pool
        return pool(self.hidden_states(token_ids), self.pooling)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        raise ConvcoreError(f"{self.file}: an encoder (embedding model): it has no next-token logits")

    def close(self) -> None:
        self.sess = None


def open_session(path: Path, options: dict[str, Any]) -> Session:
    """The session for the graph at ``path``: decoder (logits) or encoder (last_hidden_state)."""
    import onnx
    file = model_file(Path(path))
    try:
        outputs = {o.name for o in onnx.load(str(file), load_external_data=False).graph.output}
    except Exception:
        outputs = set()
    if "logits" not in outputs and "last_hidden_state" in outputs:
        return OnnxEncoderSession(Path(path), options)
    return OnnxSession(Path(path), options)
