"""The shared layers: stacked and tensor-parallel weight loading, LoRA deltas, MoE routing.

Tensor-parallel layers are checked without a process group: every rank's layer is built and
loaded from the same full checkpoint tensors, and the ranks' local results (what each rank
holds before its collective) are combined by hand and compared with the unsharded layer. One
test runs a whole model split over two gloo processes, with real collectives; it and the
model-level LoRA test use a small stand-in attention backend (one sequence, whole prompt, no
KV cache) so that they exercise the layers without the engine.
"""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from engine_service.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine_service.layers.lora import LoRASlots, TorchLoRA, attach_lora
from engine_service.layers.moe import FusedMoE, expert_weight_mapping, select_experts
from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import TensorParallel
from engine_service.models import load_model
from engine_service.models.weights import load_weights
from tests.engine_service.conftest import make_checkpoint

HIDDEN, HEAD_DIM = 32, 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _ranks(size: int) -> list[TensorParallel]:
    return [TensorParallel(rank, size) for rank in range(size)]


def _load(layer: nn.Module, pieces: dict, param: str = "weight") -> None:
    target = getattr(layer, param)
    for shard_id, tensor in pieces.items():
        target.weight_loader(target, tensor, shard_id)


# --- stacked projections -------------------------------------------------------------------


def test_qkv_shards_load_into_one_matrix_equal_to_three_projections():
    q, k, v = (
        torch.randn(4 * HEAD_DIM, HIDDEN),
        torch.randn(2 * HEAD_DIM, HIDDEN),
        torch.randn(2 * HEAD_DIM, HIDDEN),
    )
    bias = {
        "q": torch.randn(4 * HEAD_DIM),
        "k": torch.randn(2 * HEAD_DIM),
        "v": torch.randn(2 * HEAD_DIM),
    }
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads=4, num_kv_heads=2, bias=True)
    # Out of order on purpose: the shard id, not arrival order, places each piece.
    _load(layer, {"v": v, "q": q, "k": k})
    _load(layer, bias, "bias")
    x = torch.randn(5, HIDDEN)
    expected = torch.cat(
        [F.linear(x, q, bias["q"]), F.linear(x, k, bias["k"]), F.linear(x, v, bias["v"])], -1
    )
    torch.testing.assert_close(layer(x), expected)


def test_merged_gate_up_loads_by_index():
    gate, up = torch.randn(48, HIDDEN), torch.randn(48, HIDDEN)
    layer = MergedColumnParallelLinear(HIDDEN, [48, 48])
    _load(layer, {1: up, 0: gate})
    x = torch.randn(3, HIDDEN)
    torch.testing.assert_close(layer(x), torch.cat([x @ gate.T, x @ up.T], -1))


def test_a_piece_of_the_wrong_shape_or_shard_is_refused():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="does not fit shard 'k'"):
        _load(layer, {"k": torch.randn(4 * HEAD_DIM, HIDDEN)})
    with pytest.raises(ValueError, match="unknown shard"):
        _load(layer, {"o": torch.randn(4 * HEAD_DIM, HIDDEN)})


class _TinyBlock(nn.Module):
    """A module with a model's naming, to drive ``load_weights`` through a mapping."""

    packed_modules_mapping: ClassVar[dict] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads=4, num_kv_heads=2)
        self.o_proj = RowParallelLinear(4 * HEAD_DIM, HIDDEN)


def _block_checkpoint() -> dict[str, torch.Tensor]:
    return {
        "layer.q_proj.weight": torch.randn(4 * HEAD_DIM, HIDDEN),
        "layer.k_proj.weight": torch.randn(2 * HEAD_DIM, HIDDEN),
        "layer.v_proj.weight": torch.randn(2 * HEAD_DIM, HIDDEN),
        "layer.o_proj.weight": torch.randn(HIDDEN, 4 * HEAD_DIM),
        "layer.rotary_emb.inv_freq": torch.randn(4),  # no parameter of ours: skipped
    }


def test_load_weights_routes_checkpoint_names_through_the_model_mapping():
    net = nn.Module()
    net.packed_modules_mapping = _TinyBlock.packed_modules_mapping
    net.layer = _TinyBlock()
    ckpt = _block_checkpoint()
    load_weights(net, ckpt.items(), "tiny")
    stacked = torch.cat([ckpt[f"layer.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(net.layer.qkv_proj.weight, stacked)
    assert torch.equal(net.layer.o_proj.weight, ckpt["layer.o_proj.weight"])


def test_a_stacked_parameter_missing_one_shard_is_an_error():
    net = nn.Module()
    net.packed_modules_mapping = _TinyBlock.packed_modules_mapping
    net.layer = _TinyBlock()
    ckpt = _block_checkpoint()
    del ckpt["layer.v_proj.weight"]
    with pytest.raises(
        ValueError, match=r"tiny lacks weights: layer.qkv_proj.weight \(shards 'v'\)$"
    ):
        load_weights(net, ckpt.items(), "tiny")


# --- tensor-parallel shards ----------------------------------------------------------------


def test_column_parallel_halves_concatenate_to_the_full_output():
    weight, bias = torch.randn(48, HIDDEN), torch.randn(48)
    x = torch.randn(5, HIDDEN)
    outs = []
    for tp in _ranks(2):
        layer = ColumnParallelLinear(HIDDEN, 48, bias=True, tp=tp)
        _load(layer, {None: weight})
        _load(layer, {None: bias}, "bias")
        assert layer.weight.shape == (24, HIDDEN)
        outs.append(layer.local_forward(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, weight, bias))


def test_merged_column_parallel_gives_each_rank_a_slice_of_gate_and_of_up():
    gate, up = torch.randn(48, HIDDEN), torch.randn(48, HIDDEN)
    x = torch.randn(5, HIDDEN)
    gates, ups = [], []
    for tp in _ranks(2):
        layer = MergedColumnParallelLinear(HIDDEN, [48, 48], tp=tp)
        _load(layer, {0: gate, 1: up})
        g, u = layer.local_forward(x).chunk(2, -1)
        gates.append(g)
        ups.append(u)
    torch.testing.assert_close(torch.cat(gates, -1), x @ gate.T)
    torch.testing.assert_close(torch.cat(ups, -1), x @ up.T)


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_qkv_parallel_splits_query_heads_and_splits_or_replicates_kv_heads(num_kv_heads):
    q = torch.randn(4 * HEAD_DIM, HIDDEN)
    k, v = (
        torch.randn(num_kv_heads * HEAD_DIM, HIDDEN),
        torch.randn(num_kv_heads * HEAD_DIM, HIDDEN),
    )
    x = torch.randn(5, HIDDEN)
    parts = []
    for tp in _ranks(2):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, 4, num_kv_heads, tp=tp)
        _load(layer, {"q": q, "k": k, "v": v})
        assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
        parts.append(layer.local_forward(x).split([2 * HEAD_DIM, HEAD_DIM, HEAD_DIM], -1))
    torch.testing.assert_close(torch.cat([p[0] for p in parts], -1), x @ q.T)
    if num_kv_heads == 2:
        torch.testing.assert_close(torch.cat([p[1] for p in parts], -1), x @ k.T)
        torch.testing.assert_close(torch.cat([p[2] for p in parts], -1), x @ v.T)
    else:
        for _, rank_k, rank_v in parts:
            torch.testing.assert_close(rank_k, x @ k.T)
            torch.testing.assert_close(rank_v, x @ v.T)


def test_row_parallel_partial_sums_add_up_to_the_full_output_with_the_bias_once():
    weight, bias = torch.randn(HIDDEN, 48), torch.randn(HIDDEN)
    x = torch.randn(5, 48)
    total = torch.zeros(5, HIDDEN)
    for tp in _ranks(2):
        layer = RowParallelLinear(48, HIDDEN, bias=True, tp=tp)
        _load(layer, {None: weight})
        _load(layer, {None: bias}, "bias")
        total += layer.local_forward(x[:, tp.rank * 24 : (tp.rank + 1) * 24])
    torch.testing.assert_close(total, F.linear(x, weight, bias))


def test_sizes_that_do_not_divide_by_the_tp_size_are_refused():
    with pytest.raises(ValueError, match="attention heads"):
        QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads=3, num_kv_heads=1, tp=TensorParallel(0, 2))


# --- LoRA deltas ---------------------------------------------------------------------------


def _adapter(rank: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, in_features), torch.randn(out_features, rank)


def test_lora_delta_adds_each_tokens_own_adapter_and_leaves_base_tokens_alone():
    weight = torch.randn(48, HIDDEN)
    layer = ColumnParallelLinear(HIDDEN, 48)
    _load(layer, {None: weight})
    slots = LoRASlots()
    layer.lora = lora = TorchLoRA(layer, slots, max_adapters=3, max_rank=8)
    (a0, b0), (a2, b2) = _adapter(4, HIDDEN, 48), _adapter(8, HIDDEN, 48)
    lora.set_adapter(0, None, a0, b0, scaling=0.5)
    lora.set_adapter(2, None, a2, b2, scaling=2.0)

    x = torch.randn(5, HIDDEN)
    base = x @ weight.T
    slots.set(None)
    torch.testing.assert_close(layer(x), base)
    slots.set(torch.tensor([0, -1, 2, 0, -1]))
    y = layer(x)
    expected = base.clone()
    for t, (a, b, s) in {0: (a0, b0, 0.5), 2: (a2, b2, 2.0), 3: (a0, b0, 0.5)}.items():
        expected[t] += s * (b @ (a @ x[t]))
    torch.testing.assert_close(y, expected)
    assert torch.equal(y[[1, 4]], base[[1, 4]])


def test_lora_on_a_stacked_projection_changes_only_its_own_piece():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads=4, num_kv_heads=2)
    _load(
        layer,
        {"q": torch.randn(32, HIDDEN), "k": torch.randn(16, HIDDEN), "v": torch.randn(16, HIDDEN)},
    )
    slots = LoRASlots()
    layer.lora = lora = TorchLoRA(layer, slots, max_adapters=1, max_rank=4)
    a, b = _adapter(4, HIDDEN, 16)
    lora.set_adapter(0, "k", a, b, scaling=1.0)
    x = torch.randn(3, HIDDEN)
    base = layer(x)
    slots.set(torch.zeros(3, dtype=torch.long))
    delta = layer(x) - base
    torch.testing.assert_close(delta[:, 32:48], x @ a.T @ b.T)
    assert torch.equal(delta[:, :32], torch.zeros(3, 32))
    assert torch.equal(delta[:, 48:], torch.zeros(3, 16))


@pytest.mark.parametrize("kind", ["column", "row"])
def test_lora_on_tensor_parallel_ranks_combines_to_the_unsharded_delta(kind):
    weight = torch.randn(48, 48)
    a, b = _adapter(4, 48, 48)
    x = torch.randn(5, 48)
    token_slots = torch.tensor([0, -1, 0, 0, -1])
    expected = x @ weight.T
    expected[token_slots == 0] += x[token_slots == 0] @ a.T @ b.T
    outs = []
    for tp in _ranks(2):
        layer = (
            ColumnParallelLinear(48, 48, tp=tp)
            if kind == "column"
            else RowParallelLinear(48, 48, tp=tp)
        )
        _load(layer, {None: weight})
        slots = LoRASlots()
        slots.set(token_slots)
        layer.lora = TorchLoRA(layer, slots, max_adapters=1, max_rank=4)
        layer.lora.set_adapter(0, None, a, b, scaling=1.0)
        local_x = x if kind == "column" else x[:, tp.rank * 24 : (tp.rank + 1) * 24]
        outs.append(layer.local_forward(local_x))
    combined = torch.cat(outs, -1) if kind == "column" else outs[0] + outs[1]
    torch.testing.assert_close(combined, expected)


# --- mixture of experts --------------------------------------------------------------------

EXPERTS, TOP_K, INNER = 6, 2, 24


def _experts_checkpoint() -> dict[str, torch.Tensor]:
    ckpt = {}
    for e in range(EXPERTS):
        ckpt[f"moe.experts.{e}.w1.weight"] = torch.randn(INNER, HIDDEN) / 4
        ckpt[f"moe.experts.{e}.w3.weight"] = torch.randn(INNER, HIDDEN) / 4
        ckpt[f"moe.experts.{e}.w2.weight"] = torch.randn(HIDDEN, INNER) / 4
    return ckpt


def _dense_moe(x, router_logits, ckpt, renormalize):
    """Every token on its own, every chosen expert on its own (Mixtral's definition)."""
    probs = torch.softmax(router_logits, -1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, ids = torch.topk(probs[t], TOP_K)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids.tolist()):
            gate = ckpt[f"moe.experts.{e}.w1.weight"] @ x[t]
            up = ckpt[f"moe.experts.{e}.w3.weight"] @ x[t]
            out[t] += w * (ckpt[f"moe.experts.{e}.w2.weight"] @ (F.silu(gate) * up))
    return out


def _moe_net(tp: TensorParallel, renormalize: bool) -> nn.Module:
    net = nn.Module()
    net.packed_modules_mapping = expert_weight_mapping(EXPERTS, "w1", "w3", "w2")
    net.moe = nn.Module()
    net.moe.experts = FusedMoE(EXPERTS, TOP_K, HIDDEN, INNER, renormalize, tp=tp)
    return net


def test_select_experts_takes_the_top_k_by_softmax_and_renormalizes_on_request():
    logits = torch.randn(7, EXPERTS)
    weights, ids = select_experts(logits, TOP_K, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert torch.equal(ids, probs.topk(TOP_K, -1).indices)
    torch.testing.assert_close(weights, probs.gather(1, ids))
    renormed, same_ids = select_experts(logits, TOP_K, renormalize=True)
    assert torch.equal(same_ids, ids)
    torch.testing.assert_close(renormed.sum(-1), torch.ones(7))


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_reference_equals_a_dense_per_token_loop(renormalize):
    ckpt = _experts_checkpoint()
    net = _moe_net(TensorParallel(), renormalize)
    load_weights(net, ckpt.items(), "moe")
    x, router_logits = torch.randn(11, HIDDEN), torch.randn(11, EXPERTS)
    router_logits[:, 5] = -1e4  # one expert gets no token: its group is empty
    torch.testing.assert_close(
        net.moe.experts(x, router_logits), _dense_moe(x, router_logits, ckpt, renormalize)
    )


def test_moe_tensor_parallel_ranks_sum_to_the_full_output():
    ckpt = _experts_checkpoint()
    x, router_logits = torch.randn(9, HIDDEN), torch.randn(9, EXPERTS)
    total = torch.zeros(9, HIDDEN)
    for tp in _ranks(2):
        net = _moe_net(tp, renormalize=True)
        load_weights(net, ckpt.items(), "moe")
        assert net.moe.experts.w2.shape == (EXPERTS, HIDDEN, INNER // 2)
        total += net.moe.experts.local_forward(x, router_logits)
    torch.testing.assert_close(total, _dense_moe(x, router_logits, ckpt, True))


def test_moe_equals_transformers_mixtral_sparse_block():
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.3)
    ours = FusedMoE(EXPERTS, TOP_K, HIDDEN, INNER, renormalize=True)
    ours.w13.data.copy_(block.experts.gate_up_proj)
    ours.w2.data.copy_(block.experts.down_proj)
    x = torch.randn(13, HIDDEN)
    with torch.no_grad():
        expected = block(x[None])[0]
        router_logits = x @ block.gate.weight.T
    torch.testing.assert_close(ours(x, router_logits), expected)


def test_moe_missing_an_experts_piece_is_an_error():
    ckpt = _experts_checkpoint()
    del ckpt["moe.experts.4.w3.weight"]
    with pytest.raises(ValueError, match=r"lacks weights: moe.experts.w13 \(shards \(4, 'up'\)\)$"):
        load_weights(_moe_net(TensorParallel(), True), ckpt.items(), "moe")


# --- package boundaries --------------------------------------------------------------------


def test_models_and_layers_import_nothing_from_the_engine():
    code = (
        "import sys, engine_service.models, engine_service.layers.moe, engine_service.layers.lora\n"
        "print(sorted(m for m in sys.modules if m.startswith('engine_service.engine')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- a whole model under tensor parallelism, with real collectives -------------------------


class _CausalPrefill(AttentionBackend):
    """Attention for one sequence computed whole in one step (no KV cache): enough to run a
    model end to end across processes without the engine. The engine's backends are tested
    against ``transformers`` in test_parity.py; this stand-in only carries the heads."""

    name = "causal-prefill"

    def forward(self, q, k, v, kv_cache, layer, meta, scale, window):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1)


def _tp_worker(rank: int, size: int, init_file: str, ckpt: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        tp = TensorParallel(rank, size)
        net, _, _ = load_model(ckpt, _CausalPrefill(), "float32", "cpu", tp=tp)
        ids = torch.tensor([5, 17, 99, 140, 33, 8, 250])
        with torch.no_grad():
            logits = net.compute_logits(net(ids, torch.arange(len(ids)), torch.empty(0), None))
            head = ColumnParallelLinear(HIDDEN, 48, tp=tp, gather_output=True)
            _load(head, {None: torch.arange(48 * HIDDEN, dtype=torch.float32).reshape(48, HIDDEN)})
            gathered = head(torch.ones(2, HIDDEN))
        torch.save({"logits": logits, "gathered": gathered}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_model_split_over_two_processes_gives_the_single_process_logits(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "qwen2")  # biases on q/k/v, GQA: 4 heads, 2 KV heads
    mp.spawn(
        _tp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt"), str(tmp_path)),
        nprocs=2,
    )
    single, _, _ = load_model(str(tmp_path / "ckpt"), _CausalPrefill(), "float32", "cpu")
    ids = torch.tensor([5, 17, 99, 140, 33, 8, 250])
    with torch.no_grad():
        expected = single.compute_logits(single(ids, torch.arange(len(ids)), torch.empty(0), None))
    full_head = torch.arange(48 * HIDDEN, dtype=torch.float32).reshape(48, HIDDEN)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        # The vocabulary-parallel head gathers the logits on the rank that samples.
        if rank == 0:
            torch.testing.assert_close(result["logits"], expected, atol=1e-4, rtol=1e-4)
        else:
            assert result["logits"] is None
        torch.testing.assert_close(result["gathered"], torch.ones(2, HIDDEN) @ full_head.T)


def _forward(net, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(ids, torch.arange(len(ids)), torch.empty(0), None)


def test_a_models_lora_adapter_equals_its_weights_merged_into_the_base(tmp_path):
    make_checkpoint(tmp_path, "llama")  # hidden 64, 4 heads of 16, 2 KV heads
    net, _, _ = load_model(str(tmp_path), _CausalPrefill(), "float32", "cpu")
    merged, _, _ = load_model(str(tmp_path), _CausalPrefill(), "float32", "cpu")
    slots, deltas = attach_lora(net, ["qkv_proj", "down_proj"], max_adapters=2, max_rank=4)
    assert sorted(deltas) == [
        f"model.layers.{i}.{m}" for i in range(3) for m in ("mlp.down_proj", "self_attn.qkv_proj")
    ]
    v_a, v_b = _adapter(4, 64, 32)
    down_a, down_b = _adapter(2, 128, 64)
    deltas["model.layers.1.self_attn.qkv_proj"].set_adapter(1, "v", v_a, v_b, scaling=0.25)
    deltas["model.layers.0.mlp.down_proj"].set_adapter(1, None, down_a, down_b, scaling=0.5)
    with torch.no_grad():
        merged.model.layers[1].self_attn.qkv_proj.weight[96:] += 0.25 * v_b @ v_a
        merged.model.layers[0].mlp.down_proj.weight += 0.5 * down_b @ down_a

    ids = torch.tensor([5, 17, 99, 140, 33, 8])
    base = _forward(net, ids)
    slots.set(torch.full((6,), 1))
    torch.testing.assert_close(_forward(net, ids), _forward(merged, ids))
    assert not torch.allclose(_forward(net, ids), base)
    slots.set(torch.full((6,), -1))
    assert torch.equal(_forward(net, ids), base)
