"""Session fixtures for conv-gguf's tests: each conversion and reference computed once."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import convcore

sys.path.insert(0, str(Path(__file__).parent))
from gguf_testlib import TEXT  # noqa: E402


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def converted(gguf_dir, tiny_model_factory):
    """``converted(arch, quant=None, **options) -> Path``, each conversion done once."""
    cache: dict = {}

    def get(arch: str, quant: str | None = None, **options) -> Path:
        key = (arch, quant, tuple(sorted(options.items())))
        if key not in cache:
            name = f"{arch}-{quant or 'src'}-{len(cache)}.gguf"
            cache[key] = convcore.convert(tiny_model_factory(arch), gguf_dir / name, to="gguf",
                                          quant=quant, options=options or None)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_reference(tiny_model_factory):
    """``hf_reference(arch, f16=False) -> (token ids of TEXT, transformers f32 logits)``.
    With ``f16`` the 2-D weights are first rounded to f16, as an f16 GGUF stores them
    (1-D tensors stay f32 there), so the comparison measures the converter, not f16."""
    cache: dict = {}

    def get(arch: str, f16: bool = False):
        if (arch, f16) not in cache:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            src = tiny_model_factory(arch)
            ids = AutoTokenizer.from_pretrained(str(src))(TEXT)["input_ids"]
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
            with torch.no_grad():
                if f16:
                    for p in model.parameters():
                        if p.ndim >= 2:
                            p.copy_(p.half().float())
                logits = model(torch.tensor([ids])).logits[0].float().numpy()
            cache[(arch, f16)] = (ids, logits)
        return cache[(arch, f16)]

    return get
