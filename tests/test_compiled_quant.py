"""Compiled decode steps of quantized stages (``compile=true`` with ``quantize=int8|int4``): the eager tokens.

The packed kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) run inside the compiled graph, with
their activations' casts fused into the loops around them; a greedy decode through the graph gives every token of
the same stage's eager decode, in process, for a tiny random-init Llama (GQA) in int4 (group 32).
Through 2 real stage processes, an int8 pipeline with ``compile=true`` gives the eager int8 pipeline's tokens
and its stages count compiled steps. Each graph costs tens of seconds on a busy 2-core runner: one bucket each.
"""

from __future__ import annotations

import pytest
import torch

from smolcluster.inference import InferencePipeline
from smolcluster.inference.compiled import CompiledDecode
from smolcluster.pipeline.architectures import KVCache
from smolcluster.pipeline.quantize import StageFormat
from smolcluster.pipeline.weights import find_model, load_stage
from tests.conftest import wait_until
from tests.test_batching import prompt
from tests.test_compiled import compiled_steps, greedy


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 2-layer Llama (GQA, untied head) whose widths the int4 kernel takes (multiples of its group, 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama-quant")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, initializer_range=0.2)
    LlamaForCausalLM(config).eval().save_pretrained(d)
    return d


@pytest.mark.parametrize("quantize", ["int4"])  # (int8: through stage processes below, one compile less)
def test_a_quantized_stage_compiled_decodes_its_eager_tokens(llama_dir, quantize):
    src = find_model(llama_dir)
    stage = load_stage(src.weights, src.config, range(2), embed=True, head=True, fmt=StageFormat("fp32", quantize, 32))
    with torch.inference_mode():
        compiled = CompiledDecode(stage, 1, 64, torch.float32, "cpu", buckets=[1])
        compiled.warm("test")
        ids = prompt(3, 6, 256)
        want = greedy(stage, ids, 24, KVCache(len(stage.blocks), 64), None)
        assert len(set(want)) > 3  # the decode is not one repeated token: an error would show
        assert greedy(stage, ids, 24, compiled.cache(len(stage.blocks), 64, 0), compiled) == want
        assert compiled.steps == 23


def test_an_int8_pipeline_with_compiled_stages_gives_the_eager_tokens(llama_dir):
    stage = dict(stages=2, quantize="int8", heartbeat_s=0.1, liveness_s=5.0, eos_ids=[], connect_timeout_s=1200.0)
    ids = prompt(7, 5, 256)
    with InferencePipeline.start_local(llama_dir, **stage) as eager:
        want = eager.submit(ids, max_new_tokens=16).tokens()
    with InferencePipeline.start_local(llama_dir, compile=True, compile_slots=1, **stage) as compiled:
        assert compiled.submit(ids, max_new_tokens=16).tokens() == want
        assert wait_until(lambda: compiled_steps(compiled) == [15, 15], 10), compiled_steps(compiled)
