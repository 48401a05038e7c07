"""A complete convcore format plugin in one module: ``npydir``, a directory holding
``config.json``, the tokenizer files and one ``<tensor name>.npy`` per tensor."""
import json
from pathlib import Path

import numpy as np

import convcore


def detect(path):
    return 20 if (Path(path) / "tensors.json").is_file() else 0


@convcore.hookimpl
def convcore_register_formats(register):
    register(convcore.Format(name="npydir", description="one .npy per tensor",
                             directory=True, detect=detect,
                             outputs=("*.npy", "tensors.json", "config.json")))


@convcore.hookimpl
def convcore_write(model, path, fmt, options, progress):
    if fmt != "npydir":
        return None
    path.mkdir(parents=True)
    names = []
    for i, ref in enumerate(model.tensors.values()):
        array = ref.load()
        if options.get("dtype") and ref.dtype in convcore.FLOAT_DTYPES:
            array = convcore.cast(array, options["dtype"])
        # .npy has no bf16: store its bits as uint16 and remember the dtype.
        dtype = convcore.dtype_name(array.dtype)
        np.save(path / f"{i}.npy", array.view(np.uint16) if dtype == "bf16" else array)
        names.append([ref.name, dtype])
        progress(ref.name)
    (path / "tensors.json").write_text(json.dumps(names))
    (path / "config.json").write_text(json.dumps(model.config))
    convcore.write_tokenizer_files(path, model)
    return path


@convcore.hookimpl
def convcore_load(path, fmt, options):
    if fmt != "npydir":
        return None
    names = convcore.read_json(path / "tensors.json")
    config = convcore.read_json(path / "config.json")
    tensors = {}
    for i, (name, dtype) in enumerate(names):
        file = path / f"{i}.npy"
        if not file.is_file():
            raise convcore.ConvcoreError(f"{file}: missing (tensor {name!r})")
        header = np.load(file, mmap_mode="r")

        def load(file=file, dtype=dtype):
            return np.load(file, mmap_mode="r").view(convcore.numpy_dtype(dtype))

        tensors[name] = convcore.TensorRef(name, tuple(header.shape), dtype, load, source=str(file))
    return convcore.Model(arch=convcore.arch_of(config), config=config, tensors=tensors,
                          tokenizer=convcore.read_tokenizer_files(path))


@convcore.hookimpl
def convcore_validate(path, fmt):
    if fmt != "npydir":
        return None
    names = convcore.read_json(path / "tensors.json")
    return [f"{path}/{i}.npy: missing" for i in range(len(names))
            if not (path / f"{i}.npy").is_file()]
