"""Mistral: Llama-shaped, every layer attending within ``sliding_window`` tokens when it is set.

The window is honoured: a request's cache keeps only the latest ``sliding_window - 1``
keys per layer, and prompts longer than the window are masked as ``transformers`` masks them.
"""

from __future__ import annotations

from smolcluster.pipeline.architectures.llama import Llama, LlamaShape, llama_shape


class Mistral(Llama):
    model_type = "mistral"

    @staticmethod
    def read(config: dict) -> LlamaShape:
        window = config.get("sliding_window")
        return llama_shape(config, qkv_bias=False, o_bias=False,
                           windows=[window] * config["num_hidden_layers"] if window else None)
