"""Fixtures of the MGM text side: the project's tiny tokenizer and a small random LLaMA over it."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from mgmflow.models.mgm.tokenizer import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """A random 2-layer LLaMA over the tiny vocabulary, as a backbone for the decoding loop alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


# -- the model side: the official-code parity fixtures and the tiny presets ---------------------------------------

from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
ORACLE_CANDIDATES = (REPO.parent / "shared" / "fixtures" / "mgm-oracle", REPO / "shared" / "fixtures" / "mgm-oracle")


@pytest.fixture(scope="session")
def oracle_dir():
    """Checkpoints, inputs and outputs written by the official MGM code (read-only)."""
    for candidate in ORACLE_CANDIDATES:
        if candidate.is_dir():
            return candidate
    pytest.skip(f"the MGM parity fixtures are not checked out (looked in {[str(c) for c in ORACLE_CANDIDATES]})")


@pytest.fixture(scope="session")
def tiny_mgm(mgmflow_home):
    """(model, processor) of the tiny LLaMA preset, built once per session under a private MGMFLOW_HOME."""
    from mgmflow.models.mgm import load_pretrained

    return load_pretrained("tiny")


@pytest.fixture(scope="session")
def tiny_hd_mgm(mgmflow_home):
    from mgmflow.models.mgm import load_pretrained

    return load_pretrained("tiny-hd")
