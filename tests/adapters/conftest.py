"""Fixtures of the adapter tests: ``world`` (operations against a fake vLLM, fake_vllm)."""

from fake_vllm import world  # noqa: F401 - a fixture, shared by the unit-tier modules
