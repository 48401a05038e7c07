"""The direct builder: an HF decoder -> the ONNX directory onnxruntime-genai loads, written
from the weights with no torch model.

The graph is the one ONNX Runtime runs fastest on CPU (as onnxruntime-genai's builder
lays it out): fused q/k/v MatMul, ``GroupQueryAttention`` with rotary embedding and the
KV cache inside, ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization``,
and com.microsoft ``MatMulNBits`` for int4/int8 weights. Each weight is read, cast or
quantized and appended to ``model.onnx.data`` one at a time.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from convcore import (
    ConvcoreError, Model, cast, get_registry, numpy_dtype, page_releaser, quantize,
    write_companions, write_tokenizer_files,
)

from .archs import Decoder, decoder_for, layer_names
from .export_genai import genai_config_for
from .export_quant import parse_scheme, user_metadata
from .graph import Chunked, Graph, tensors_metadata
from .kernels import transposed

DATA_FILE = "model.onnx.data"
#: a float weight of this many bytes or more is made and written a block of rows at a
#: time (about STREAM_BLOCK bytes each), never whole
STREAM_BYTES = 64 << 20
STREAM_BLOCK = 16 << 20


def _stacked(sources: list[np.ndarray]) -> Callable[[int, int], list[tuple[np.ndarray, Callable]]]:
    """``rows(a, b)``: rows [a, b) of ``sources`` stacked by rows (a fused q/k/v), as the
    pieces of each source they span, each with the releaser of its mapped pages."""
    starts = np.cumsum([0] + [src.shape[0] for src in sources])
    releases = [page_releaser(src) for src in sources]

    def rows(a: int, b: int) -> list[tuple[np.ndarray, Callable]]:
        out = []
        for src, start, release in zip(sources, starts, releases):
            lo, hi = max(a - start, 0), min(b - start, src.shape[0])
            if lo < hi:
                out.append((src[lo:hi], release))
        return out

    return rows


def io_dtype(model: Model, options: dict[str, Any]) -> str:
    """``--dtype``, else f16 for an f16 source and f32 for the rest (bf16 runs in f32 on CPU)."""
    dtype = options.get("dtype")
    if dtype:
        if dtype not in ("f32", "f16"):
            raise ConvcoreError(f"onnx: --dtype {dtype} is not supported; choose f32 or f16")
        return str(dtype)
    floats = {t.dtype for t in model.tensors.values() if t.dtype in ("f32", "f16", "bf16")}
    return "f16" if floats == {"f16"} else "f32"


class Builder:
    def __init__(self, model: Model, options: dict[str, Any]):
        self.model = model
        self.d: Decoder = decoder_for(model.arch, model.config)
        self.dtype = io_dtype(model, options)
        self.scheme = options.get("quant") or None
        self.bits = parse_scheme(self.scheme) if self.scheme else None
        self.accuracy = int(options.get("accuracy_level", 4))
        self.quant_lm_head = bool(options.get("quantize_lm_head", True))
        self.context = int(options.get("context_length") or self.d.context)
        self.registry = get_registry()
        self.g = Graph()
        missing = [n for n in self._required() if n not in model.tensors]
        if missing:
            raise ConvcoreError(f"onnx: {model.source or 'model'}: {model.arch} tensors missing: "
                                f"{', '.join(missing[:3])}")

    def _required(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.d.layers):
            names += [n for k, n in layer_names(self.d, i).items() if not k.endswith("_bias")]
        return names

    # -- weights ------------------------------------------------------------------------
    def _load(self, name: str, dtype: str) -> np.ndarray:
        return cast(self.model.tensors[name].load(), dtype)

    def _rows_of(self, name: str, dtype: str) -> np.ndarray | Chunked:
        """A 2-D weight cast to ``dtype``: whole, or when large a block of rows at a time."""
        shape = tuple(self.model.tensors[name].shape)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * numpy_dtype(dtype).itemsize
        if len(shape) < 2 or shape[0] * row_bytes < STREAM_BYTES:
            return self._load(name, dtype)
        return Chunked(shape, dtype, lambda a, b: cast(self.model.tensors[name].load()[a:b], dtype),
                       max(1, STREAM_BLOCK // max(1, row_bytes)))

    def _stack(self, names: list[str], dtype: str) -> np.ndarray:
        parts = [self._load(n, dtype) for n in names]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def vector(self, init: str, hf: str) -> str:
        """A 1-D weight (norm, bias) in the io dtype."""
        shape = self.model.tensors[hf].shape
        group = self.g.group(lambda: {init: self._load(hf, self.dtype)}, (hf,))
        self.g.tensors[hf] = {"init": init}
        return self.g.weight(init, self.dtype, shape, group)

    def vectors(self, init: str, hfs: list[str]) -> str:
        """Several 1-D weights concatenated (the fused q/k/v bias)."""
        sizes = [self.model.tensors[n].shape[0] for n in hfs]
        group = self.g.group(lambda: {init: self._stack(hfs, self.dtype)}, tuple(hfs))
        start = 0
        for n, size in zip(hfs, sizes):
            self.g.tensors[n] = {"init": init, "rows": [start, start + size]}
            start += size
        return self.g.weight(init, self.dtype, (sum(sizes),), group)

    def matmul(self, x: str, prefix: str, hfs: list[str], quantized: bool = True) -> str:
        """``x @ W.T`` for the HF weights ``hfs`` stacked by rows ([N, K] each): a MatMul on
        the transposed matrix, or MatMulNBits on the quantized one."""
        shapes = [self.model.tensors[n].shape for n in hfs]
        k = shapes[0][1]
        if any(len(s) != 2 or s[1] != k for s in shapes):
            raise ConvcoreError(f"onnx: {', '.join(hfs)}: shapes {shapes} do not stack")
        n = sum(s[0] for s in shapes)
        row = 0
        if self.bits and quantized:
            bits, block, _ = self.bits
            layout = self.registry.schemes[self.scheme].layout((n, k), "f32")
            tag = f"{prefix}.MatMul.weight"
            names = {"q": f"{tag}_Q{bits}", "scales": f"{tag}_scales", "zero_points": f"{tag}_zero_points"}
            dtype = self.dtype

            def produce() -> dict[str, np.ndarray]:
                data = quantize(self._stack(hfs, "f32"), self.scheme, {"name": hfs[0]},
                                registry=self.registry).data
                out = {names["q"]: data["q"], names["scales"]: cast(data["scales"], dtype)}
                if "zero_points" in data:
                    out[names["zero_points"]] = data["zero_points"]
                return out

            def produce_blocks() -> dict[str, Chunked]:
                # never a whole f32 copy (lm_head: 262 MB): rows [a, b) are quantized as
                # the codes are written; scales and zero points (a 32nd of the codes'
                # rows, but 67 MB for a 262144 x 2048 lm_head) are spilled to a temporary
                # file in that pass and read back a block at a time after the codes
                stacked = _stacked([self.model.tensors[h].load() for h in hfs])
                spill = {part: tempfile.TemporaryFile() for part in ("scales", "zero_points") if part in layout}
                kinds = {part: dtype if part == "scales" else layout[part][0] for part in spill}
                row_bytes = {part: int(np.prod(layout[part][1][1:], dtype=np.int64))
                             * numpy_dtype(kinds[part]).itemsize for part in spill}

                def codes(a: int, b: int) -> np.ndarray:
                    parts = []
                    for piece, release in stacked(a, b):
                        parts.append(cast(piece, "f32"))
                        release(piece)
                    rows = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
                    data = quantize(rows, self.scheme, {"name": hfs[0]}, registry=self.registry).data
                    for part, f in spill.items():
                        made = data["scales"] if part == "scales" else data[part]
                        f.write(np.ascontiguousarray(cast(made, kinds[part])).reshape(-1).view(np.uint8).data)
                    return data["q"]

                def spilled(part: str) -> Callable[[int, int], np.ndarray]:
                    shape, size = layout[part][1], row_bytes[part]

                    def rows(a: int, b: int) -> np.ndarray:
                        f = spill[part]
                        f.seek(a * size)
                        raw = f.read((b - a) * size)
                        if len(raw) != (b - a) * size:
                            raise ConvcoreError(f"onnx: {names[part]} is written before its codes")
                        if b == shape[0]:
                            f.close()
                        return np.frombuffer(raw, numpy_dtype(kinds[part])).reshape((b - a, *shape[1:]))
                    return rows

                out = {names["q"]: Chunked(layout["q"][1], "u8", codes,
                                           max(1, STREAM_BLOCK // (k * 4)))}
                for part in spill:
                    out[names[part]] = Chunked(layout[part][1], kinds[part], spilled(part),
                                               max(1, STREAM_BLOCK // max(1, row_bytes[part])))
                return out

            if n * k * 4 >= STREAM_BYTES:
                produce = produce_blocks  # noqa: F811 - the large matrices' producer

            group = self.g.group(produce, tuple(hfs))
            inputs = [x]
            for part in ("q", "scales", "zero_points"):
                if part in layout:
                    dt = dtype if part == "scales" else layout[part][0]
                    inputs.append(self.g.weight(names[part], dt, layout[part][1], group))
            for name, s in zip(hfs, shapes):
                entry = {"init": names["q"], "scales": names["scales"], "scheme": self.scheme,
                         "shape": [n, k], "rows": [row, row + s[0]]}
                if "zero_points" in layout:
                    entry["zero_points"] = names["zero_points"]
                self.g.tensors[name] = entry
                row += s[0]
            return self.g.op("MatMulNBits", inputs, f"/{prefix}/MatMulNBits", domain="com.microsoft",
                             K=k, N=n, bits=bits, block_size=block, accuracy_level=self.accuracy)
        init = f"{prefix}.MatMul.weight"
        dtype = self.dtype

        def blocks() -> dict[str, Chunked]:
            # never whole (lm_head in f32 is 262 MB for a 32k x 2048 model): columns
            # [a, b) of the [K, N] weight are rows [a, b) of the stacked sources,
            # transposed; each source page is read once and leaves the resident set then
            stacked = _stacked([self.model.tensors[h].load() for h in hfs])

            def columns(a: int, b: int) -> np.ndarray:
                parts = stacked(a, b)
                block = transposed([p for p, _ in parts], dtype)
                for p, release in parts:
                    release(p)
                return block

            step = max(1, STREAM_BLOCK // (k * numpy_dtype(dtype).itemsize))
            return {init: Chunked((k, n), dtype, columns, step, columns=True)}

        if k * n * numpy_dtype(dtype).itemsize >= STREAM_BYTES:
            group = self.g.group(blocks, tuple(hfs))
        else:
            group = self.g.group(lambda: {init: transposed([self.model.tensors[h].load() for h in hfs], dtype)},
                                 tuple(hfs))
        for name, s in zip(hfs, shapes):
            self.g.tensors[name] = {"init": init, "transpose": True, "rows": [row, row + s[0]]}
            row += s[0]
        w = self.g.weight(init, dtype, (k, n), group)
        return self.g.op("MatMul", [x, w], f"/{prefix}/MatMul")

    # -- graph pieces ------------------------------------------------------------------
    def scalar(self, value: float) -> str:
        return self.g.const(np.array(value, dtype=np.float16 if self.dtype == "f16" else np.float32))

    def norm_weight(self, init: str, hf: str) -> str:
        w = self.vector(init, hf)
        if self.d.norm_offset:  # gemma: x * (1 + w), folded by ONNX Runtime at load
            w = self.g.op("Add", [w, self.scalar(1.0)], f"/{init}/offset")
        return w

    def norm(self, x: str, init: str, hf: str, name: str) -> str:
        return self.g.op("RMSNormalization", [x, self.norm_weight(init, hf)], name,
                         axis=-1, epsilon=self.d.eps, stash_type=1)

    def skip_norm(self, h: str, delta: str | None, init: str, hf: str, name: str) -> tuple[str, str]:
        """Normalized ``h + delta`` and the new residual stream ``h + delta``."""
        if delta is None:
            return self.norm(h, init, hf, name), h
        out = self.g.node("SkipSimplifiedLayerNormalization", [h, delta, self.norm_weight(init, hf)],
                          name, 4, domain="com.microsoft", epsilon=self.d.eps)
        return out[0], out[3]

    def build(self) -> None:
        d, g = self.d, self.g
        io = self.dtype
        g.io("input_ids", "i64", ["batch_size", "sequence_length"])
        g.io("attention_mask", "i64", ["batch_size", "total_sequence_length"])
        for i in range(d.layers):
            for kind in ("key", "value"):
                g.io(f"past_key_values.{i}.{kind}", io,
                     ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim])
        # sequence lengths GroupQueryAttention wants, from the attention mask
        one = g.const(np.array([1], dtype=np.int64))
        total_len = g.op("ReduceSum", ["attention_mask", one], "/mask/ReduceSum", keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [total_len, one], "/mask/Sub")], "/mask/seqlens_k", to=6)
        shape = g.op("Shape", ["attention_mask"], "/mask/Shape")
        total = g.op("Cast", [g.op("Gather", [shape, g.const(np.array(1, dtype=np.int64))],
                                   "/mask/Gather", axis=0)], "/mask/total_sequence_length", to=6)
        self.seqlens, self.total = seqlens, total
        caches = {}
        for key, rope in d.ropes.items():
            cos, sin = rope.tables(self.context)
            suffix = "" if key == "global" else f"_{key}"
            group = g.group(lambda c=cos, s=sin, x=suffix: {f"cos_cache{x}": cast(c, io),
                                                            f"sin_cache{x}": cast(s, io)}, ())
            caches[key] = (g.weight(f"cos_cache{suffix}", io, cos.shape, group),
                           g.weight(f"sin_cache{suffix}", io, sin.shape, group))
            if rope.long_inv_freq is not None:
                caches[key] = self._longrope(key, rope, caches[key], suffix, io)

        embed = "model.embed_tokens.weight"
        e = g.weight(embed, io, self.model.tensors[embed].shape,
                     g.group(lambda: {embed: self._rows_of(embed, io)}, (embed,)))
        g.tensors[embed] = {"init": embed}
        h = g.op("Gather", [e, "input_ids"], "/model/embed_tokens/Gather")
        if d.embed_scale:
            h = g.op("Mul", [h, self.scalar(d.embed_scale)], "/model/embed_tokens/scale")
        delta: str | None = None
        for i in range(d.layers):
            names = layer_names(d, i)
            p = f"model.layers.{i}"
            x, h = self.skip_norm(h, delta, f"{p}.input_layernorm.weight", names["input_norm"],
                                  f"/{p}/input_layernorm")
            a = self.attention(i, x, names, caches[d.layer_rope[i]])
            if d.sandwich:
                a = self.norm(a, f"{p}.post_attention_layernorm.weight", names["post_attn_norm"],
                              f"/{p}/post_attention_layernorm")
                x, h = self.skip_norm(h, a, f"{p}.pre_feedforward_layernorm.weight",
                                      names["pre_ffn_norm"], f"/{p}/pre_feedforward_layernorm")
            else:
                x, h = self.skip_norm(h, a, f"{p}.post_attention_layernorm.weight",
                                      names["post_attn_norm"], f"/{p}/post_attention_layernorm")
            delta = self.mlp(i, x, names)
            if d.sandwich:
                delta = self.norm(delta, f"{p}.post_feedforward_layernorm.weight",
                                  names["post_ffn_norm"], f"/{p}/post_feedforward_layernorm")
        x, _ = self.skip_norm(h, delta, "model.norm.weight", "model.norm.weight", "/model/norm")
        lm = "lm_head.weight" if "lm_head.weight" in self.model.tensors else embed
        if lm == embed:
            # tied: the embedding is written again, as lm_head's matrix; the reader
            # takes the embedding from its own initializer
            saved = g.tensors[embed]
            logits = self.matmul(x, "lm_head", [embed], quantized=self.quant_lm_head)
            g.tensors[embed] = saved
        else:
            logits = self.matmul(x, "lm_head", [lm], quantized=self.quant_lm_head)
        if d.final_softcap:
            cap = self.scalar(d.final_softcap)
            t = g.op("Tanh", [g.op("Div", [logits, cap], "/lm_head/softcap/Div")], "/lm_head/softcap/Tanh")
            logits = g.op("Mul", [t, cap], "/lm_head/softcap/Mul")
        g.nodes[-1].output[0] = "logits"
        g.io("logits", io, ["batch_size", "sequence_length", d.vocab], output=True)
        for i in range(d.layers):
            for kind in ("key", "value"):
                g.io(f"present.{i}.{kind}", io,
                     ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim], output=True)

    def _longrope(self, key: str, rope: Any, short: tuple[str, str], suffix: str, io: str) -> tuple[str, str]:
        """LongRoPE's tables chosen per run as transformers chooses them: the long ones
        once the total sequence is longer than the original context, else the short."""
        g = self.g
        cos, sin = rope.tables(self.context, long=True)
        group = g.group(lambda c=cos, s=sin, x=suffix: {f"cos_cache_long{x}": cast(c, io),
                                                        f"sin_cache_long{x}": cast(s, io)}, ())
        long = (g.weight(f"cos_cache_long{suffix}", io, cos.shape, group),
                g.weight(f"sin_cache_long{suffix}", io, sin.shape, group))
        is_long = g.op("Greater", [self.total, g.const(np.array(rope.threshold, dtype=np.int32))],
                       f"/rope{suffix}/is_long")
        return (g.op("Where", [is_long, long[0], short[0]], f"/rope{suffix}/cos"),
                g.op("Where", [is_long, long[1], short[1]], f"/rope{suffix}/sin"))

    def attention(self, i: int, x: str, names: dict[str, str], cache: tuple[str, str]) -> str:
        d, g = self.d, self.g
        p = f"model.layers.{i}"
        qkv_names = [names["qkv"]] if d.fused_qkv else [names["q"], names["k"], names["v"]]
        qkv = self.matmul(x, f"{p}.attn.qkv_proj", qkv_names)
        bias = [names.get(k) or f"{p}.self_attn.{k[0]}_proj.bias" for k in ("q_bias", "k_bias", "v_bias")]
        if all(b in self.model.tensors for b in bias):
            qkv = g.op("Add", [qkv, self.vectors(f"{p}.attn.qkv_proj.Add.bias", bias)],
                       f"/{p}/attn/qkv_proj/Add")
        inputs = [qkv, "", ""]
        if d.qk_norm:
            q, k, v = g.node("Split", [qkv, g.const(np.array([d.q_size, d.kv_size, d.kv_size], np.int64))],
                             f"/{p}/attn/qkv_split", 3, axis=-1)
            per_head = g.const(np.array([0, 0, -1, d.head_dim], np.int64))
            flat = {"q": g.const(np.array([0, 0, d.q_size], np.int64)),
                    "k": g.const(np.array([0, 0, d.kv_size], np.int64))}
            normed = {}
            for tag, t in (("q", q), ("k", k)):
                r = g.op("Reshape", [t, per_head], f"/{p}/attn/{tag}_norm/Reshape")
                r = self.norm(r, f"{p}.attn.{tag}_norm.weight", names[f"{tag}_norm"], f"/{p}/attn/{tag}_norm")
                normed[tag] = g.op("Reshape", [r, flat[tag]], f"/{p}/attn/{tag}_norm/Reshape_back")
            inputs = [normed["q"], normed["k"], v]
        window = d.windows[i]
        # local_window_size = HF's sliding_window (checked against transformers past the window)
        attn = g.node("GroupQueryAttention",
                      [*inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                       self.seqlens, self.total, *cache],
                      f"/{p}/attn/GroupQueryAttention",
                      [f"/{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                      domain="com.microsoft", num_heads=d.heads, kv_num_heads=d.kv_heads,
                      scale=float(d.scale), local_window_size=window if window else -1,
                      softcap=float(d.attn_softcap), do_rotary=1, rotary_interleaved=0)[0]
        o = self.matmul(attn, f"{p}.attn.o_proj", [names["o"]])
        o_bias = f"{p}.self_attn.o_proj.bias"
        if o_bias in self.model.tensors:
            o = g.op("Add", [o, self.vector(f"{p}.attn.o_proj.Add.bias", o_bias)], f"/{p}/attn/o_proj/Add")
        return o

    def mlp(self, i: int, x: str, names: dict[str, str]) -> str:
        d, g = self.d, self.g
        p = f"model.layers.{i}"
        if d.fused_gate_up:
            gu = self.matmul(x, f"{p}.mlp.gate_up_proj", [names["gate_up"]])
            gate, up = g.node("Split", [gu], f"/{p}/mlp/gate_up_split", 2, axis=-1, num_outputs=2)
        else:
            gate = self.matmul(x, f"{p}.mlp.gate_proj", [names["gate"]])
            up = self.matmul(x, f"{p}.mlp.up_proj", [names["up"]])
        if d.activation == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"/{p}/mlp/act/Sigmoid")], f"/{p}/mlp/act/Mul")
        elif d.activation == "gelu_tanh":
            act = g.op("FastGelu", [gate], f"/{p}/mlp/act/FastGelu", domain="com.microsoft")
        else:
            act = g.op("Gelu", [gate], f"/{p}/mlp/act/Gelu", domain="com.microsoft")
        m = g.op("Mul", [act, up], f"/{p}/mlp/Mul")
        return self.matmul(m, f"{p}.mlp.down_proj", [names["down"]])


def write_builder(model: Model, path: Path, options: dict[str, Any], progress: Callable[[str], None]) -> Path:
    b = Builder(model, options)
    b.build()
    if options.get("dry_run"):
        for w in b.g.weights:
            print(f"{w.name} {w.dtype}{list(w.shape)}")
        return path
    path.mkdir(parents=True, exist_ok=True)
    initializers = b.g.write_weights(path / DATA_FILE, DATA_FILE, progress)
    for name in model.tensors:
        if name not in b.g.tensors:
            progress(name)  # e.g. rotary inv_freq buffers: the graph computes its own
    # in the source's order, so a reader hands the tensors on as the source had them
    placed = {name: b.g.tensors[name] for name in model.tensors if name in b.g.tensors}
    meta = {"convcore.tensors": tensors_metadata(placed), "convcore.path": "builder",
            "convcore.dtype": b.dtype}
    if b.scheme:
        meta["convcore.quant"] = b.scheme
    meta.update(user_metadata(options))
    proto = b.g.model(initializers, meta)
    (path / "model.onnx").write_bytes(proto.SerializeToString())
    config = dict(model.config)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_tokenizer_files(path, model)
    write_companions(path, model)
    try:
        gen = genai_config_for(
            model.config, model.metadata.get("generation_config"),
            inputs={"input_ids": "input_ids", "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            outputs={"logits": "logits", "present_key_names": "present.%d.key",
                     "present_value_names": "present.%d.value"},
            share_buffer=True, head_size=b.d.head_dim, num_key_value_heads=b.d.kv_heads,
            num_hidden_layers=b.d.layers)
    except (ValueError, KeyError) as exc:
        raise ConvcoreError(f"onnx: genai_config.json: {exc}") from None
    gen["model"]["context_length"] = gen["search"]["max_length"] = b.context
    (path / "genai_config.json").write_text(json.dumps(gen, indent=4) + "\n")
    return path
