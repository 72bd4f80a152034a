"""Expert parallelism at the layer level, with real collectives (gloo, two processes): a
FusedMoE whose experts are shared out over two ranks, tokens dispatched and combined
all-to-all, gives the single-process layer's output, with and without the micro-batch
overlap, for batches of every size down to one token (an empty share on one rank); and under
data-parallel attention, where each rank brings its own batch of a different size (down to
none), each rank gets its own tokens' output."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine_service.layers.expert_parallel import ExpertParallel, expert_ranges
from engine_service.layers.moe import FusedMoE, expert_weight_mapping
from engine_service.layers.parallel import TensorParallel
from engine_service.models.weights import load_weights, materialize

HIDDEN, INNER, TOP_K = 16, 24, 2
EXPERTS = 5  # not a multiple of the ranks: rank 0 holds 3, rank 1 holds 2
TOKEN_COUNTS = (13, 5, 4, 3, 2, 1)  # odd counts: shares of different sizes


def _checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ckpt = {}
    for e in range(EXPERTS):
        ckpt[f"experts.{e}.w1.weight"] = torch.randn(INNER, HIDDEN, generator=generator) / 4
        ckpt[f"experts.{e}.w3.weight"] = torch.randn(INNER, HIDDEN, generator=generator) / 4
        ckpt[f"experts.{e}.w2.weight"] = torch.randn(HIDDEN, INNER, generator=generator) / 4
    return ckpt


def _layer(tp: TensorParallel) -> torch.nn.Module:
    net = torch.nn.Module()
    net.packed_modules_mapping = expert_weight_mapping(
        EXPERTS, "w1", "w3", "w2", checkpoint_prefix="experts", param_prefix="moe"
    )
    with torch.device("meta"):  # as the model loader builds models
        net.moe = FusedMoE(EXPERTS, TOP_K, HIDDEN, INNER, renormalize=True, tp=tp)
    materialize(net, torch.device("cpu"), torch.float32)
    load_weights(net, _checkpoint().items(), "ep-test")
    return net.moe


def _inputs(num_tokens: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(num_tokens if seed is None else seed)
    x = torch.randn(num_tokens, HIDDEN, generator=generator)
    router_logits = torch.randn(num_tokens, EXPERTS, generator=generator)
    if num_tokens > 4:
        router_logits[:, 4] = -1e4  # rank 1's last expert gets no token at all
    return x, router_logits


def _ep_rank(rank: int, size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        moe = _layer(TensorParallel(rank, size, expert_parallel=True))
        results = {"w13": moe.w13.clone(), "first": moe.first_expert}
        with torch.no_grad():
            for overlap in (True, False):
                moe.ep.overlap = overlap
                for n in TOKEN_COUNTS:
                    results[(overlap, n)] = moe(*_inputs(n))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_experts_are_shared_out_in_contiguous_ranges():
    assert expert_ranges(5, 2) == [(0, 3), (3, 5)]
    assert expert_ranges(256, 8)[7] == (224, 256)
    with pytest.raises(ValueError, match="cannot be shared out"):
        ExpertParallel(0, 4, num_experts=3)


def test_two_expert_parallel_ranks_give_the_single_process_output(tmp_path):
    mp.spawn(_ep_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single = _layer(TensorParallel())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Each rank loaded whole experts, its own range of them, and nothing else.
    assert [r["first"] for r in ranks] == [0, 3]
    assert ranks[0]["w13"].shape == (3, 2 * INNER, HIDDEN)
    torch.testing.assert_close(ranks[1]["w13"], single.w13[3:])
    with torch.no_grad():
        for n in TOKEN_COUNTS:
            expected = single(*_inputs(n))
            for result in ranks:
                for overlap in (True, False):
                    torch.testing.assert_close(result[(overlap, n)], expected)


# Data-parallel attention: (rank 0's tokens, rank 1's tokens) per layer call; a rank with no
# token at all, and ranks whose micro-batches are empty, still take part in the exchanges.
DP_TOKEN_COUNTS = ((13, 0), (0, 5), (1, 4), (7, 2), (1, 1), (0, 1))


def _dp_inputs(rank: int, counts: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _inputs(counts[rank], seed=100 * rank + 10 * counts[0] + counts[1])


def _dp_rank(rank: int, size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        # Tensor-parallel size 1 inside each of the `size` data-parallel ranks.
        moe = _layer(TensorParallel(0, 1, expert_parallel=True, dp_rank=rank, dp_size=size))
        results = {"first": moe.first_expert, "share_size": moe.ep.share_size}
        with torch.no_grad():
            for overlap in (True, False):
                moe.ep.overlap = overlap
                for counts in DP_TOKEN_COUNTS:
                    results[(overlap, counts)] = moe(*_dp_inputs(rank, counts))
        torch.save(results, f"{out_dir}/dp{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_with_their_own_batches_get_their_own_outputs(tmp_path):
    mp.spawn(_dp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single = _layer(TensorParallel())
    ranks = [torch.load(tmp_path / f"dp{r}.pt") for r in range(2)]
    assert [r["first"] for r in ranks] == [0, 3]  # experts shared out over the DP ranks
    assert [r["share_size"] for r in ranks] == [1, 1]  # no tokens shared between them
    with torch.no_grad():
        for rank, result in enumerate(ranks):
            for counts in DP_TOKEN_COUNTS:
                expected = single(*_dp_inputs(rank, counts))
                for overlap in (True, False):
                    got = result[(overlap, counts)]
                    assert got.shape == (counts[rank], HIDDEN)
                    torch.testing.assert_close(got, expected)


def test_a_moe_layer_under_data_parallelism_without_expert_parallelism_holds_every_expert():
    """Each data-parallel rank runs all experts on its own tokens, split only over its own
    tensor-parallel group (here two ranks: half of each expert's inner dimension)."""
    tp = TensorParallel(1, 2, dp_rank=1, dp_size=2)
    moe = FusedMoE(EXPERTS, TOP_K, HIDDEN, INNER, tp=tp)
    assert moe.ep is None
    assert moe.w13.shape == (EXPERTS, INNER, HIDDEN)  # gate and up halves: 2 x INNER / 2
