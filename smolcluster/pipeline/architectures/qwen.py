"""Qwen2 / Qwen2.5 (biases on q/k/v) and Qwen3 (per-head q/k RMSNorm, an explicit head_dim): Llama-shaped."""

from __future__ import annotations

from smolcluster.pipeline.architectures.llama import Llama, LlamaShape, llama_shape


def windows(config: dict) -> list[int | None] | None:
    """Per layer: the sliding window when ``use_sliding_window`` (``layer_types`` says which layers), else None."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    if window is None:
        return None
    n = config["num_hidden_layers"]
    types = config.get("layer_types") or ["sliding_attention" if i >= config.get("max_window_layers", n) else
                                          "full_attention" for i in range(n)]
    return [window if t == "sliding_attention" else None for t in types]


class Qwen2(Llama):
    model_type = "qwen2"

    @staticmethod
    def read(config: dict) -> LlamaShape:
        return llama_shape(config, qkv_bias=True, o_bias=False, windows=windows(config))


class Qwen3(Llama):
    model_type = "qwen3"

    @staticmethod
    def read(config: dict) -> LlamaShape:
        return llama_shape(config, qk_norm=True, windows=windows(config))
