"""Packaging as users install it: each distribution built as a wheel and installed into a
fresh venv one at a time, and each step behaves as the README says.

Third-party dependencies come from the package index (pip's cache makes reruns quick);
our own distributions only from the wheels built here, pinned to their versions.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTS = {"convcore": ROOT, "quant-rowwise": ROOT / "plugins" / "quant-rowwise",
         "conv-gguf": ROOT / "plugins" / "conv-gguf", "conv-mlx": ROOT / "plugins" / "conv-mlx",
         "conv-parquet": ROOT / "plugins" / "conv-parquet", "conv-onnx": ROOT / "plugins" / "conv-onnx",
         "convcore-ray": ROOT / "plugins" / "convcore-ray",
         "convcore-fleet": ROOT / "plugins" / "convcore-fleet",
         "convcore-sweep": ROOT / "plugins" / "convcore-sweep",
         "convcore-serve": ROOT / "plugins" / "convcore-serve"}

pytestmark = pytest.mark.slow


def version_of(project: Path) -> str:
    return tomllib.loads((project / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """Wheels of our distributions, built from copies so no build/ lands in the repo."""
    house = tmp_path_factory.mktemp("wheels")
    work = tmp_path_factory.mktemp("wheel-src")
    for name, project in DISTS.items():
        copy = work / name
        ignore = shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", "__pycache__",
                                        "tests", ".git", "plugins", "bench", "demo-out", ".bench")
        shutil.copytree(project, copy, ignore=ignore)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(house), str(copy)],
                       check=True, capture_output=True, text=True)
    return house


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wheelhouse):
    """A fresh venv and ``install(dist)`` / ``run(*args)`` helpers bound to it."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    pins = home / "pins.txt"
    pins.write_text("".join(f"{n}=={version_of(p)}\n" for n, p in DISTS.items())
                    + "torch==2.13.0\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONVCORE_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{home / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def install(dist: str) -> None:
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--find-links",
                            str(wheelhouse), "-c", str(pins), dist],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]

    def run(*args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(home / "bin" / "convcore"), *map(str, args)],
                           capture_output=True, text=True, env=env)
        if check:
            assert r.returncode == 0, r.stderr[-3000:]
        return r

    def py(code: str) -> str:
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    return install, run, py


def formats(run) -> dict:
    return {f["format"]: f for f in json.loads(run("formats", "--json").stdout)}


def test_one_distribution_at_a_time(fresh, tiny_model_factory, tmp_path):
    install, run, py = fresh
    spm = tiny_model_factory("llama")     # SentencePiece
    bpe = tiny_model_factory("qwen2")     # byte-level BPE

    # 1. the core alone: hf and the adapter folders it reads, and a missing format says so
    install("convcore")
    assert list(formats(run)) == ["fake", "hf", "mlx-adapter", "peft"]
    r = run("run", spm, "-o", tmp_path / "x.gguf", "--to", "gguf", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: unknown format 'gguf' (known: fake, hf, mlx-adapter, peft); "
                               "no installed plugin provides it")
    run("run", spm, "-o", tmp_path / "f16", "--to", "hf", "--dtype", "f16", "-q")
    #    the fleet's and the server's commands are plugins': the core names them
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[model]]\nid = "t"\nsource = "{spm}"\n[[target]]\nto = "hf"\nquant = "f16"\n')
    r = run("batch", jobs, "-q", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "pip install convcore-fleet" in r.stderr
    assert "jsonschema" not in py("import sys, convcore.cli; print(sorted(sys.modules))")
    for command, dist in (("serve", "convcore-serve"), ("sweep", "convcore-sweep")):
        r = run(command, tmp_path / "f16", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"pip install {dist}" in r.stderr

    # 2. convcore-fleet: a batch on the local executor, its registry checked against the
    #    schema (jsonschema comes with the plugin); the ray executor is another package's
    install("convcore-fleet")
    run("batch", jobs, "-q")
    run("registry", "validate", tmp_path / "jobs-out" / "model_registry.json")
    r = run("batch", jobs, "--executor", "ray", check=False)
    assert r.returncode == 1 and "no executor named 'ray'" in r.stderr

    # 3. conv-gguf alone brings what its formats list: every gguf type converts, from
    #    both tokenizer kinds (sentencepiece/protobuf and the k-quant kernels included)
    install("conv-gguf")
    gguf_types = formats(run)["gguf"]["schemes"]
    assert "q4_k_m" in gguf_types and "npz" in formats(run)  # quant-rowwise came along
    run("run", spm, "-o", tmp_path / "spm-q4_k_m.gguf", "--to", "gguf", "--quant", "q4_k_m", "-q")
    run("run", bpe, "-o", tmp_path / "bpe-q4_k_m.gguf", "--to", "gguf", "--quant", "q4_k_m", "-q")
    # the runtime is an extra: its absence is one line naming it
    r = run("infer", tmp_path / "spm-q4_k_m.gguf", "--tokens", "1,2,3", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "pip install 'conv-gguf[infer]'" in r.stderr



@pytest.mark.full
def test_the_other_distributions_one_at_a_time(fresh, tiny_model_factory, tmp_path):
    """conv-mlx, conv-parquet, conv-onnx and convcore-ray added one at a time to the venv
    the test above left with the core and conv-gguf (the default tier's sample)."""
    install, run, py = fresh
    install("convcore-fleet")   # (and the core): already there when the test above ran
    spm = tiny_model_factory("llama")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[model]]\nid = "t"\nsource = "{spm}"\n[[target]]\nto = "hf"\nquant = "f16"\n')
    run("batch", jobs, "-q")

    # 3. conv-mlx: its affine schemes work from the install alone
    install("conv-mlx")
    assert "int4-g64" in formats(run)["mlx"]["schemes"]
    run("run", spm, "-o", tmp_path / "mlx4", "--to", "mlx", "--quant", "int4-g64", "-q")
    run("validate", tmp_path / "mlx4")

    # 4. conv-parquet: V2 int8-row from the install alone (pyarrow from the index), and back
    install("conv-parquet")
    assert "int8-row" in formats(run)["parquet"]["schemes"]
    run("run", spm, "-o", tmp_path / "q.parquet", "--to", "parquet", "--quant", "int8-row", "-q")
    run("validate", tmp_path / "q.parquet")
    run("run", tmp_path / "q.parquet", "-o", tmp_path / "q-hf", "--to", "hf", "-q")
    assert (tmp_path / "q-hf" / "config.json").is_file()
    assert (tmp_path / "q-hf" / "tokenizer.model").read_bytes() == (spm / "tokenizer.model").read_bytes()
    assert "WeightLoader" in py("import conv_parquet; print(conv_parquet.WeightLoader.__name__)")

    # 5. conv-onnx: the builder and MatMulNBits from the install alone (onnx from the index);
    #    the runtime is the [infer] extra
    install("conv-onnx")
    assert "int4-b32" in formats(run)["onnx"]["schemes"]
    run("run", spm, "-o", tmp_path / "onnx4", "--to", "onnx", "--quant", "int4-b32", "-q")
    run("validate", tmp_path / "onnx4")
    r = run("infer", tmp_path / "onnx4", "--tokens", "1,2,3", check=False)
    assert r.returncode == 1 and "pip install 'conv-onnx[infer]'" in r.stderr
    install("conv-onnx[infer]")
    run("infer", tmp_path / "onnx4", "--tokens", "1,2,3", "--max-tokens", "3")
    run("run", tmp_path / "onnx4", "-o", tmp_path / "onnx-hf", "--to", "hf", "-q")

    # 6. convcore-serve adds its command (starlette and uvicorn come with it)
    install("convcore-serve")
    assert "--api-key" in run("serve", "--help").stdout
    install("convcore-sweep")
    assert "--max-kl" in run("sweep", "--help").stdout

    # 7. convcore-ray: the same batch as Ray tasks on a Ray started for it (ray from the index)
    install("convcore-ray")
    (tmp_path / "ray.toml").write_text(jobs.read_text().replace('id = "t"', 'id = "r"'))
    run("batch", tmp_path / "ray.toml", "-q", "--executor", "ray", "-X", "num_cpus=1")
    assert (tmp_path / "ray-out" / "r" / "hf-f16" / "model.safetensors").read_bytes() == \
        (tmp_path / "jobs-out" / "t" / "hf-f16" / "model.safetensors").read_bytes()


@pytest.mark.full
def test_every_gguf_type_from_the_wheel(fresh, tiny_model_factory, tmp_path, run_cli):
    """Every gguf type converts from conv-gguf's install alone (each type's kernels are
    compiled in the fresh venv: a minute; the default tier converts q4_k_m above), with an
    importance matrix (made here, in the dev environment, which has torch), since the
    low-bit IQ types refuse to run without one."""
    from convcore.testing.tiny_tokenizers import CORPUS

    install, run, py = fresh
    spm = tiny_model_factory("llama")
    imatrix = tmp_path / "imatrix.gguf"
    made = run_cli("imatrix", spm, "--text", CORPUS, "--ctx", "64", "--chunks", "4", "-o", imatrix)
    assert made.returncode == 0, made.stderr
    install("conv-gguf")
    gguf_types = formats(run)["gguf"]["schemes"]
    out = tmp_path / "all"
    py("import convcore, sys\n"
       f"for t in {gguf_types!r}:\n"
       f"    convcore.convert({str(spm)!r}, {str(out)!r} + '-' + t + '.gguf', to='gguf', quant=t,\n"
       f"                     options={{'imatrix': {str(imatrix)!r}}})\n")
    assert sorted(p.name for p in tmp_path.glob("all-*.gguf")) == sorted(
        f"all-{t}.gguf" for t in gguf_types)
