"""Test kit for convcore and its plugins: tiny real models and shared fixtures.

Installed as a pytest plugin (entry point ``pytest11``), so every test suite that has
convcore installed gets the fixtures ``tiny_model_factory`` and ``tiny_llama``.
"""
from .models import ARCHS, make_tiny_model, tiny_model

__all__ = ["ARCHS", "make_tiny_model", "tiny_model"]
