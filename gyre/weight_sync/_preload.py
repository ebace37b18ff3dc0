"""Imported once by EngineProcess's fork server, so that forked engines start without import costs."""

from __future__ import annotations

import contextlib

import gyre.weight_sync.process  # noqa: F401

with contextlib.suppress(Exception):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for _arch in ("llama", "qwen2", "qwen3", "qwen3_moe"):  # config classes import most of transformers
        CONFIG_MAPPING[_arch]
