"""The engine's logits against transformers' own Qwen3-MoE and Mixtral, same weights, float32.

For every scheduling shape, each emitted token's logits must match the reference forward
over the same token sequence within 1e-4 relative, and every greedy token must be the
reference's argmax (so greedy decoding yields identical token ids).
"""

from __future__ import annotations

import pytest
import torch

from engine_adapter.config import EngineConfig
from engine_adapter.engine import Engine
from policies.fixed import FixedGroups
from tests.greedy_outputs import greedy_outputs

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (37, 90, 128)
MAX_TOKENS = 32
REL_TOL = 1e-4


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _run(folder, mode: str, policy=None, **cfg) -> tuple[list[list[int]], list[list[int]],
                                                        list[torch.Tensor]]:
    engine = Engine(EngineConfig(model=str(folder), weights=str(folder), mode=mode,
                                 kv_cache_tokens=4096, **cfg), decide=policy)
    prompts = _prompts(engine.model_config.vocab_size)
    return (prompts, *greedy_outputs(engine, prompts, MAX_TOKENS))


def _check_against_reference(reference, prompts, tokens, logits) -> None:
    for prompt, toks, lgts in zip(prompts, tokens, logits):
        assert len(toks) == MAX_TOKENS
        full = torch.tensor([prompt + toks[:-1]])
        with torch.no_grad():
            ref = reference(full).logits[0, len(prompt) - 1:]
        ours = lgts
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel <= REL_TOL, f"relative logits error {rel:.2e}"
        assert toks == ref.argmax(-1).tolist(), "greedy tokens differ from the reference"


CASES = {
    "whole-prompt": ("chunked", None, {"chunk_tokens": 4096}),
    "chunked-7": ("chunked", None, {"chunk_tokens": 7}),
    "chunked-16": ("chunked", None, {"chunk_tokens": 16}),
    "chunked-64": ("chunked", None, {"chunk_tokens": 64}),
    "layered-G1": ("layered", FixedGroups(1), {"prefill_budget": 4096}),
    "layered-G2": ("layered", FixedGroups(2), {"prefill_budget": 4096}),
    "layered-G3-not-dividing": ("layered", FixedGroups(3), {"prefill_budget": 4096}),
    "layered-G=L": ("layered", FixedGroups(64), {"prefill_budget": 4096}),
    "layered-pieces": ("layered", FixedGroups(2), {"prefill_budget": 50}),
    "layered-staggered": ("layered", FixedGroups(3, budget=40, staggered=True),
                          {"prefill_budget": 4096}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tiny_checkpoint, reference, case):
    mode, policy, cfg = CASES[case]
    if policy is not None and policy.groups == 64:
        policy = FixedGroups(reference.config.num_hidden_layers)
    prompts, tokens, logits = _run(tiny_checkpoint, mode, policy, **cfg)
    _check_against_reference(reference, prompts, tokens, logits)


def test_greedy_generate_matches_transformers(tiny_checkpoint, reference):
    """transformers' own greedy generate() gives the engine's token ids."""
    prompts, tokens, _ = _run(tiny_checkpoint, "layered", FixedGroups(2), prefill_budget=4096)
    for prompt, toks in zip(prompts, tokens):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, min_new_tokens=MAX_TOKENS)
        assert out[0, len(prompt):].tolist() == toks


def test_sliding_window_mixtral_matches_transformers(tmp_path):
    from engine_adapter.model_config import ModelConfig
    from engine_adapter.weights import dummy_weights, save_safetensors

    hf = dict(ModelConfig.load("mixtral-tiny").hf_config, sliding_window=24)
    config = ModelConfig.from_hf_dict(hf)
    folder = save_safetensors(config, dummy_weights(config, torch.float32, torch.device("cpu"), 5),
                              tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, attn_implementation="eager").eval()
    prompts, tokens, logits = _run(folder, "layered", FixedGroups(3), prefill_budget=40)
    _check_against_reference(reference, prompts, tokens, logits)


def test_bfloat16_runs_and_mostly_agrees_with_float32(tiny_checkpoint):
    """bfloat16 is a supported dtype: it runs every path and stays close to float32."""
    _, tokens32, logits32 = _run(tiny_checkpoint, "layered", FixedGroups(2), prefill_budget=64)
    _, tokens16, logits16 = _run(tiny_checkpoint, "layered", FixedGroups(2), prefill_budget=64,
                                 dtype="bfloat16")
    first32 = torch.stack([lg[0] for lg in logits32])
    first16 = torch.stack([lg[0].float() for lg in logits16])
    assert (first16 - first32).abs().max() / first32.abs().max() < 5e-2
    assert all(len(t) == MAX_TOKENS for t in tokens16)


@pytest.mark.parametrize("model", ["qwen3-moe-tiny", "mixtral-tiny", "qwen3-moe-cpu"])
def test_grouped_experts_are_the_loop_over_experts_bit_for_bit(model, monkeypatch):
    """The CPU's grouped matmul path of the MoE layer (float32) against the loop over experts
    (what the GPU and bfloat16 run): the same outputs to the bit, from one row (most experts
    idle) to 300."""
    from engine_adapter import model as model_module
    from engine_adapter.model_config import ModelConfig
    from engine_adapter.weights import dummy_weights

    if not model_module.GROUPED_MM:
        pytest.skip("this PyTorch has no grouped matmul")
    cfg = ModelConfig.load(model)
    net = model_module.MoETransformer(cfg, dummy_weights(cfg, torch.float32,
                                                         torch.device("cpu"), 0))
    layer = next(w for w in net.weights.layers if w.router is not None)
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 3, 64, 300):
        x = torch.randn(rows, cfg.hidden_size, generator=gen) * 0.5
        grouped = net.moe(x, layer)
        monkeypatch.setattr(model_module, "GROUPED_MM", False)
        looped = net.moe(x, layer)
        monkeypatch.setattr(model_module, "GROUPED_MM", True)
        assert torch.equal(grouped.output, looped.output), (model, rows)
        assert torch.equal(grouped.expert_tokens, looped.expert_tokens)
