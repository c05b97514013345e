"""Shared fixtures: tiny random models built once per test session, in a temp folder."""

from __future__ import annotations

import pytest

from tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama with a real byte-level BPE tokenizer (adds BOS)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 (no BOS added, like the real Qwen tokenizers)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")
