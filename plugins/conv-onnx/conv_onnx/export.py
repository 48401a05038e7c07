"""The export path: ``torch.onnx.export(dynamo=True)`` of the transformers model.

Any architecture transformers builds goes through here, at the price of a plain ONNX
graph (no fused ONNX Runtime kernels): decoders (``*ForCausalLM``) with a KV cache in and
out, in optimum's names, plus a ``genai_config.json`` so onnxruntime-genai generates with
it; encoders (``AutoModel``) with ``last_hidden_state`` out.

Layout written to ``path``: ``model.onnx``, every weight in one ``model.onnx.data`` beside
it, ``config.json``, the tokenizer files and (decoders) ``genai_config.json``. The
ModelProto's ``metadata_props["convcore.tensors"]`` is JSON ``{hf_name: {"init": name,
"transpose": bool}}`` for every tensor of the source, so the HF checkpoint can be read back.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from convcore import ConvcoreError, Model, get_registry, numpy_dtype, write_companions, write_tokenizer_files

from .export_genai import genai_config_for
from .export_quant import quantize_matmuls, user_metadata
from .export_graph import (
    METADATA_KEY, Placement, check_placements, fold_weight_transposes, optimize_keeping,
    place_tensors, rename_initializers, save_with_external_data, strip_debug_metadata,
)

EXPORT_DTYPES = ("f32", "f16")
MIN_OPSET = 18
WRAPPER_ATTR = "hf"  # the wrapper module's attribute holding the transformers model
# sample sizes for tracing: distinct values above 1, so no axis is specialised to a constant
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST, SAMPLE_ENCODER_SEQ = 2, 3, 5, 8


def export_onnx(model: Model, path: Path, options: dict[str, Any],
                progress: Callable[[str], None]) -> Path:
    """Export ``model`` to the ONNX directory ``path`` (created here); see the module
    docstring for the layout. ``options``: ``dtype`` f32 (default) or f16, ``opset``."""
    if options.get("dry_run"):
        return _dry_run(model, Path(path), options, progress)
    dtype = options.get("dtype") or "f32"
    if dtype not in EXPORT_DTYPES:
        raise ConvcoreError(f"the onnx export path writes {' or '.join(EXPORT_DTYPES)}, not {dtype!r}")
    scheme = options.get("quant") or None
    opset = options.get("opset")
    if opset is not None and int(opset) < MIN_OPSET:
        raise ConvcoreError(f"the onnx export path needs opset >= {MIN_OPSET}, not {opset}")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConvcoreError(f"the onnx export path needs torch, transformers and onnxscript "
                            f"(pip install 'conv-onnx[export]'): {exc}") from None
    config = model.config
    if config.get("is_encoder_decoder"):
        raise ConvcoreError(f"{model.arch}: encoder-decoder models are not supported by the onnx export path")
    path = Path(path)
    path.mkdir(parents=True)
    try:
        _export_into(model, path, dtype, None if opset is None else int(opset), progress,
                     quant=(scheme, int(options.get("accuracy_level", 4)),
                            bool(options.get("quantize_lm_head", True))) if scheme else None,
                     metadata=user_metadata(options))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _dry_run(model: Model, path: Path, options: dict[str, Any], progress: Callable[[str], None]) -> Path:
    """``-O dry_run``: the export's initializers (name, type, shape), as the builder lists
    its own; the graph is exported in a temporary directory and nothing is left at ``path``."""
    import onnx
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.dry-") as tmp:
        out = export_onnx(model, Path(tmp) / "onnx", {**options, "dry_run": False}, lambda name: None)
        proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
        for init in proto.graph.initializer:
            kind = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
            print(f"{init.name} {kind}{list(init.dims)}")
    return path


def _export_into(model: Model, path: Path, dtype: str, opset: int | None,
                 progress: Callable[[str], None], quant: tuple[str, int, bool] | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    config = model.config
    with _hf_directory(model, path) as src:
        torch_model = _load_torch_model(src, model, dtype)
        exporter = _CausalExport(torch_model) if is_causal_lm(config) else _EncoderExport(torch_model)
        program = exporter.export(model, opset)
        placed = _finish_graph(program.model, torch_model, model, dtype)
        turn_end = _turn_end_id(src) if exporter.causal else None
    ir_model = program.model
    entries: dict[str, dict[str, Any]] = {name: {"init": p.init, "transpose": p.transpose}
                                          for name, p in placed.items()}
    if quant is not None:
        scheme, accuracy, lm_head = quant
        entries.update(quantize_matmuls(ir_model, placed, model, scheme, dtype, accuracy, lm_head))
        ir_model.metadata_props["convcore.quant"] = scheme
    ir_model.metadata_props[METADATA_KEY] = json.dumps(entries)
    ir_model.metadata_props.update(metadata or {})
    strip_debug_metadata(ir_model)
    stored = {e[k] for e in entries.values() for k in ("init", "scales", "zero_points") if k in e}
    save_with_external_data(ir_model, path / "model.onnx", stored)
    del program, ir_model, torch_model
    for name in placed:
        progress(name)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_tokenizer_files(path, model)
    write_companions(path, model)
    if exporter.causal:
        genai = genai_config_for(
            config, model.metadata.get("generation_config"),
            inputs=exporter.genai_inputs(), outputs=exporter.genai_outputs(), share_buffer=False,
            filename="model.onnx", head_size=exporter.head_size,
            num_key_value_heads=exporter.kv_heads, num_hidden_layers=exporter.num_layers,
            turn_end_id=turn_end)
        (path / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")


# which transformers class --------------------------------------------------------------
def is_causal_lm(config: dict[str, Any]) -> bool:
    """A decoder LM: ``architectures`` ends with ``ForCausalLM`` (or ``LMHeadModel``);
    without architectures, a model_type transformers has a causal LM for and no masked LM."""
    archs = [str(a) for a in config.get("architectures") or []]
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )
    model_type = config.get("model_type")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


@contextlib.contextmanager
def _hf_directory(model: Model, path: Path) -> Iterator[Path]:
    """An HF directory transformers can load: the source itself when it is one, else the
    IR written by the core's hf writer to a temporary directory beside ``path``."""
    source = Path(model.source) if model.source else None
    if model.format == "hf" and source is not None and source.is_dir():
        yield source
        return
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.hf-") as tmp:
        target = Path(tmp) / "hf"
        get_registry().write(model, target, "hf", {}, lambda name: None)
        yield target


def _first_line(exc: BaseException) -> str:
    """The first line of the innermost error (torch wraps the real cause in generic ones)."""
    inner = exc
    seen = set()
    while (inner.__cause__ or inner.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    for err in (inner, exc):
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        if lines:
            return f"{type(err).__name__}: {lines[0]}"
    return type(exc).__name__


def _load_torch_model(src: Path, model: Model, dtype: str) -> Any:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    torch_dtype = {"f32": torch.float32, "f16": torch.float16}[dtype]
    cls = transformers.AutoModelForCausalLM if is_causal_lm(model.config) else transformers.AutoModel
    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    try:
        hf_logging.set_verbosity_error()  # the load report lists head weights AutoModel leaves out
        torch_model, info = cls.from_pretrained(str(src), dtype=torch_dtype, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ConvcoreError(f"{model.arch}: transformers cannot build the model ({cls.__name__}): "
                            f"{_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    # weights transformers had to initialise at random: an encoder's pooler is left out of
    # the outputs; anything else would be exported as noise
    missing = sorted(info.get("missing_keys") or ())
    torch_model.convcore_random_pooler = any(k.split(".")[0] == "pooler" for k in missing)
    missing = [k for k in missing if k.split(".")[0] != "pooler"]
    if missing:
        raise ConvcoreError(f"{model.arch}: the checkpoint lacks {len(missing)} weights {cls.__name__} "
                            f"needs, e.g. {missing[0]!r}")
    torch_model.convcore_expert_fqns = dense_experts(torch_model)
    return torch_model.eval()


def _dense_experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    """Every expert on every token, weighted by the router's top-k weights (zero for the
    rest): the same sum as transformers' experts, with no data-dependent shapes, so it
    exports (the grouped-matmul and per-expert-loop forms do not)."""
    import torch
    weights = torch.zeros(hidden_states.shape[0], len(self.convcore_experts),
                          dtype=top_k_weights.dtype, device=hidden_states.device)
    weights = weights.scatter(1, top_k_index, top_k_weights).to(hidden_states.dtype)
    out = None
    for e, expert in enumerate(self.convcore_experts):
        y = expert.down_proj(self.act_fn(expert.gate_proj(hidden_states)) * expert.up_proj(hidden_states))
        y = y * weights[:, e:e + 1]
        out = y if out is None else out + y
    return out


#: the per-expert HF checkpoint names: (layer, expert, role) by the role's names
EXPERT_NAME = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
EXPERT_ROLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def dense_experts(torch_model: Any) -> dict[tuple[int, int, str], str]:
    """Give transformers' stacked-experts modules (Mixtral, Qwen2/3-MoE: ``gate_up_proj``
    ``[E, 2F, H]``, ``down_proj`` ``[E, H, F]``, no biases) one ``Linear`` per expert and
    part, as the checkpoint has them (so each is an initializer of its own, under its HF
    name, and can be quantized like any matrix), and the exportable forward above.
    Returns ``{(layer, expert, role): module FQN of the weight}``."""
    import types

    import torch
    from torch import nn
    found: dict[tuple[int, int, str], str] = {}
    for fqn, module in list(torch_model.named_modules()):
        up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (getattr(up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(module, "act_fn")
                and getattr(module, "gate_up_proj_bias", None) is None):
            continue
        layer = re.search(r"layers\.(\d+)\b", fqn)
        n_experts, two_f, hidden = up.shape
        f = two_f // 2
        experts = nn.ModuleList()
        with torch.no_grad():
            for e in range(n_experts):
                expert = nn.Module()
                for role, weight in (("gate_proj", up[e, :f]), ("up_proj", up[e, f:]), ("down_proj", down[e])):
                    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
                    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                    setattr(expert, role, linear)
                    if layer is not None:
                        found[(int(layer.group(1)), e, role)] = f"{fqn}.convcore_experts.{e}.{role}.weight"
                experts.append(expert)
        del module.gate_up_proj, module.down_proj
        module.convcore_experts = experts
        module.forward = types.MethodType(_dense_experts_forward, module)
    return found


def _turn_end_id(src: Path) -> int | None:
    """The tokenizer's eos token id (chat models end a turn with it), or None."""
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(src))
        token = tok.eos_token
        return None if token is None else int(tok.convert_tokens_to_ids(token))
    except Exception:  # noqa: BLE001 - no or unusual tokenizer: config's ids stand
        return None


def _output_cache(out: Any) -> Any:
    """The cache a transformers output returns (``cache``; ``past_key_values`` before 5.x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _forward_params(torch_model: Any) -> set[str]:
    return set(inspect.signature(torch_model.forward).parameters)


def _export(wrapper: Any, args: tuple, dynamic_shapes: dict, input_names: list[str],
            output_names: list[str], opset: int | None, arch: str,
            kwargs: dict[str, Any] | None = None) -> Any:
    import torch

    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, opset_version=opset, optimize=False, verbose=False,
                external_data=True)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ConvcoreError(f"{arch}: torch.onnx.export failed: {_first_line(exc)}") from None
    finally:
        onnx_logger.setLevel(level)
    return program


class _CausalExport:
    """A decoder LM with its KV cache as flat tensors: inputs ``input_ids``,
    ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/.value``; outputs
    ``logits``, ``present.{i}.key/.value`` (past + new tokens, so no buffer sharing)."""

    causal = True

    def __init__(self, torch_model: Any) -> None:
        self.torch_model = torch_model
        params = _forward_params(torch_model)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.use_position_ids = "position_ids" in params
        self.num_layers = 0
        self.kv_heads: int | None = None
        self.head_size: int | None = None

    def genai_inputs(self) -> dict[str, str]:
        inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
        if self.use_position_ids:
            inputs["position_ids"] = "position_ids"
        inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
        return inputs

    def genai_outputs(self) -> dict[str, str]:
        return {"logits": "logits", "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value"}

    def _cache_shapes(self, arch: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(key shape, value shape) of each layer's cache after one token, from an eager run."""
        import torch
        from transformers import DynamicCache

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.torch_model(input_ids=torch.zeros((1, 1), dtype=torch.long),
                                   **{self.cache_kw: DynamicCache()}, use_cache=True)
        layers = getattr(_output_cache(out), "layers", None)
        if not layers:
            raise ConvcoreError(f"{arch}: the model returned no KV cache; the onnx export path "
                                f"exports decoders with a key/value cache")
        shapes = []
        for i, layer in enumerate(layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.ndim != 4:
                raise ConvcoreError(f"{arch}: cache layer {i} ({type(layer).__name__}) holds no "
                                    f"[batch, heads, seq, head_dim] keys and values; the onnx export "
                                    f"path exports attention KV caches only")
            shapes.append((tuple(keys.shape), tuple(values.shape)))
        return shapes

    def export(self, model: Model, opset: int | None) -> Any:
        import torch

        arch = model.arch
        shapes = self._cache_shapes(arch)
        self.num_layers = len(shapes)
        self.kv_heads = int(shapes[0][0][1])
        self.head_size = int(shapes[0][0][3])
        dtype = next(self.torch_model.parameters()).dtype
        b, s, p = SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST
        vocab = int(getattr(self.torch_model.config, "vocab_size", None) or 2)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab, (b, s), generator=generator)
        attention_mask = torch.ones((b, p + s), dtype=torch.long)
        attention_mask[1, 0] = 0  # a left-padded row, so the mask is traced as data
        position_ids = torch.arange(p, p + s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
        past = [(torch.randn((b, k[1], p, k[3]), generator=generator).to(dtype),
                 torch.randn((b, v[1], p, v[3]), generator=generator).to(dtype)) for k, v in shapes]

        axes = {0: "batch_size", 1: "sequence_length"}
        past_axes = {0: "batch_size", 2: "past_sequence_length"}
        names = ["input_ids", "attention_mask"]
        args: list[Any] = [input_ids, attention_mask]
        dynamic: dict[str, Any] = {"input_ids": axes,
                                   "attention_mask": {0: "batch_size", 1: "total_sequence_length"}}
        if self.use_position_ids:
            names.append("position_ids")
            args.append(position_ids)
            dynamic["position_ids"] = axes
        args.append(past)
        dynamic["past_key_values"] = [(past_axes, past_axes) for _ in past]
        input_names = names + [f"past_key_values.{i}.{kv}" for i in range(len(past)) for kv in ("key", "value")]
        output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(len(past)) for kv in ("key", "value")]
        wrapper = _CausalWrapper(self.torch_model, self.cache_kw, self.use_position_ids)
        return _export(wrapper, tuple(args), dynamic, input_names, output_names, opset, arch)


class _EncoderExport:
    """An encoder (``AutoModel``): ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` when the config has ``type_vocab_size``) in; ``last_hidden_state``
    (and ``pooler_output`` when the model has a pooler) out."""

    causal = False

    def __init__(self, torch_model: Any) -> None:
        self.torch_model = torch_model
        params = _forward_params(torch_model)
        config = torch_model.config
        self.use_token_types = bool(getattr(config, "type_vocab_size", None)) and "token_type_ids" in params
        self.use_mask = "attention_mask" in params

    def export(self, model: Model, opset: int | None) -> Any:
        import torch

        b, s = SAMPLE_BATCH, SAMPLE_ENCODER_SEQ
        vocab = int(getattr(self.torch_model.config, "vocab_size", None) or 2)
        generator = torch.Generator().manual_seed(0)
        inputs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, (b, s), generator=generator)}
        if self.use_mask:
            mask = torch.ones((b, s), dtype=torch.long)
            mask[1, -2:] = 0  # a right-padded row, so the mask is traced as data
            inputs["attention_mask"] = mask
        if self.use_token_types:
            types = torch.zeros((b, s), dtype=torch.long)
            types[:, s // 2:] = 1
            inputs["token_type_ids"] = types
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.torch_model(**inputs)
        output_names = ["last_hidden_state"]
        if getattr(out, "last_hidden_state", None) is None:
            raise ConvcoreError(f"{model.arch}: the model returns no last_hidden_state; the onnx export "
                                f"path exports decoders (*ForCausalLM) and encoders (AutoModel)")
        if (isinstance(getattr(out, "pooler_output", None), torch.Tensor)
                and not getattr(self.torch_model, "convcore_random_pooler", False)):
            output_names.append("pooler_output")
        axes = {0: "batch_size", 1: "sequence_length"}
        wrapper = _EncoderWrapper(self.torch_model, list(inputs), output_names)
        return _export(wrapper, (), {k: axes for k in inputs}, list(inputs), output_names, opset,
                       model.arch, kwargs=inputs)


@functools.cache
def _wrapper_classes() -> tuple[type, type, type]:
    import torch

    class CausalWrapper(torch.nn.Module):
        def __init__(self, hf_model: Any, cache_kw: str) -> None:
            super().__init__()
            setattr(self, WRAPPER_ATTR, hf_model)
            self.cache_kw = cache_kw

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                    past_key_values: Any) -> tuple:
            return self.run(input_ids, attention_mask, past_key_values, position_ids=position_ids)

        def run(self, input_ids: Any, attention_mask: Any, past_key_values: Any, **extra: Any) -> tuple:
            from transformers import DynamicCache

            cache = DynamicCache()  # full-length layers: present = past + new, in every layer
            for i, (key, value) in enumerate(past_key_values):
                cache.update(key, value, i)
            out = getattr(self, WRAPPER_ATTR)(input_ids=input_ids, attention_mask=attention_mask,
                                               **extra, **{self.cache_kw: cache}, use_cache=True)
            flat = [out.logits]
            for layer in _output_cache(out).layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    class CausalWrapperNoPositions(CausalWrapper):
        def forward(self, input_ids: Any, attention_mask: Any,  # type: ignore[override]
                    past_key_values: Any) -> tuple:
            return self.run(input_ids, attention_mask, past_key_values)

    class EncoderWrapper(torch.nn.Module):
        def __init__(self, hf_model: Any, input_names: list[str], output_names: list[str]) -> None:
            super().__init__()
            setattr(self, WRAPPER_ATTR, hf_model)
            self.input_names = input_names
            self.output_names = output_names

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> tuple:
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            out = getattr(self, WRAPPER_ATTR)(**{k: given[k] for k in self.input_names})
            return tuple(getattr(out, name) for name in self.output_names)

    return CausalWrapper, CausalWrapperNoPositions, EncoderWrapper


def _CausalWrapper(hf_model: Any, cache_kw: str, use_position_ids: bool) -> Any:  # noqa: N802
    """The causal wrapper module (its class is built lazily: torch is optional)."""
    return _wrapper_classes()[0 if use_position_ids else 1](hf_model, cache_kw)


def _EncoderWrapper(*args: Any) -> Any:  # noqa: N802
    return _wrapper_classes()[2](*args)


# names -------------------------------------------------------------------------------------
def _hf_to_fqn(torch_model: Any, model: Model) -> dict[str, str]:
    """``{hf_name: module FQN}`` for each source tensor transformers loaded as is (same
    shape), allowing for the base model prefix (``bert.`` in a BertForMaskedLM checkpoint
    loaded as BertModel)."""
    named: dict[str, Any] = dict(torch_model.named_parameters(remove_duplicate=False))
    for name, buf in torch_model.named_buffers(remove_duplicate=False):
        named.setdefault(name, buf)
    prefix = getattr(torch_model, "base_model_prefix", "") or ""
    found: dict[str, str] = {}
    for hf_name, ref in model.tensors.items():
        candidates = [hf_name]
        if prefix:
            if hf_name.startswith(prefix + "."):
                candidates.append(hf_name[len(prefix) + 1:])
            candidates.append(f"{prefix}.{hf_name}")
        expert = EXPERT_NAME.search(hf_name)
        if expert is not None:
            layer, e, role = int(expert.group(1)), int(expert.group(2)), expert.group(3)
            fqn = getattr(torch_model, "convcore_expert_fqns", {}).get((layer, e, EXPERT_ROLE.get(role, role)))
            if fqn is not None:
                candidates.insert(0, fqn)
        for fqn in candidates:
            tensor = named.get(fqn)
            if tensor is not None and tuple(tensor.shape) == tuple(ref.shape):
                found[hf_name] = fqn
                break
    return found


def _finish_graph(ir_model: Any, torch_model: Any, model: Model, dtype: str) -> dict[str, Placement]:
    """Name, fold and optimize the exported graph; returns where each HF tensor went."""
    import onnx_ir as ir

    graph = ir_model.graph
    named: dict[str, Any] = dict(torch_model.named_parameters(remove_duplicate=False))
    for name, buf in torch_model.named_buffers(remove_duplicate=False):
        named.setdefault(name, buf)
    aliases: dict[int, list[str]] = {}
    for fqn, tensor in named.items():
        aliases.setdefault(id(tensor), []).append(fqn)

    # the exporter's initializer for each tensor (one per shared tensor), by wrapper FQN
    prefix = WRAPPER_ATTR + "."
    init_of: dict[int, str] = {}
    for init_name in list(graph.initializers):
        fqn = init_name[len(prefix):] if init_name.startswith(prefix) else None
        if fqn in named:
            init_of[id(named[fqn])] = init_name

    hf_fqn = _hf_to_fqn(torch_model, model)
    hf_by_tensor: dict[int, list[str]] = {}
    for hf_name, fqn in hf_fqn.items():
        hf_by_tensor.setdefault(id(named[fqn]), []).append(hf_name)

    # names: an HF tensor's initializer takes its (first) HF name, others their FQN
    renames: dict[str, str] = {}
    for key, init_name in init_of.items():
        hf_names = hf_by_tensor.get(key)
        renames[init_name] = hf_names[0] if hf_names else init_name[len(prefix):]
    taken = set(graph.initializers) - set(renames)
    renames = {old: (new if new not in taken else old) for old, new in renames.items()}
    rename_initializers(graph, renames)

    wanted: dict[str, Placement] = {}
    for hf_name in model.tensors:
        key = id(named[hf_fqn[hf_name]]) if hf_name in hf_fqn else None
        init = renames.get(init_of[key]) if key in init_of else None
        wanted[hf_name] = Placement(init or hf_name)
    weights = {p.init for p in wanted.values() if p.init in graph.initializers}
    folded = fold_weight_transposes(graph, weights)
    for hf_name, where in wanted.items():
        if where.init in folded:
            wanted[hf_name] = Placement(folded[where.init], True)
    saved = {p.init: graph.initializers[p.init].const_value
             for p in wanted.values() if p.init in graph.initializers}
    try:
        optimize_keeping(ir_model, {p.init for p in wanted.values()})
    except Exception as exc:  # noqa: BLE001 - onnxscript raises many types
        raise ConvcoreError(f"{model.arch}: optimizing the exported graph failed: {_first_line(exc)}") from None

    export_dtype = numpy_dtype(dtype)

    def from_source(hf_name: str) -> Callable[[], Any]:
        def build() -> Any:
            fqn = hf_fqn.get(hf_name)
            if fqn is not None:
                return ir.tensor(named[fqn].detach().contiguous().numpy(), name=hf_name)
            ref = model.tensors[hf_name]
            array = ref.load()
            if array.dtype.kind == "f" or ref.dtype == "bf16":
                array = array.astype("float32").astype(export_dtype)
            return ir.tensor(array, name=hf_name)
        return build

    fallback = {name: from_source(name) for name in model.tensors}
    placed = place_tensors(graph, wanted, saved, fallback)
    check_placements(graph, placed, {n: tuple(r.shape) for n, r in model.tensors.items()})
    return placed
