"""The population update split across ranks: exact sums with the same bits for any world size."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from unitrain.envs.rollout import shard
from unitrain.rules.population.reduce import NOISE_BOUND, exact_sum, global_max, noise_sum
from unitrain.rules.population.service import noise


class Group:
    """``world_size`` ranks in threads of this process, with an all-reduce over them."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[Any] = [None] * world_size
        self.calls = [0] * world_size

    def run(self, fn) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def main(rank: int) -> None:
            try:
                out[rank] = fn(Ctx(self, rank))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


class Ctx:
    device = torch.device("cpu")

    def __init__(self, group: Group, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        g = self.group
        g.slots[self.rank] = tensor.clone()
        g.barrier.wait()
        parts = list(g.slots)
        g.barrier.wait()
        if op == "sum":
            total = parts[0].clone()
            for p in parts[1:]:
                total += p
        else:
            total = torch.stack(parts).amax(0)
        tensor.copy_(total)
        return tensor


def _terms(count: int, numel: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    scales = torch.logspace(-6, 3, count, dtype=torch.float64)
    return [torch.randn(numel, generator=gen, dtype=torch.float64) * s for s in scales]


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
def test_exact_sum_has_the_same_bits_for_any_world_size(world_size: int, block: int):
    terms = _terms(13, 257)
    bound = sum(float(t.abs().max()) for t in terms)
    def add(k: int, out: torch.Tensor) -> None:
        out.add_(terms[k])

    one = Group(1).run(lambda ctx: exact_sum(ctx, range(13), add, bound, (257,), block))[0]
    many = Group(world_size).run(lambda ctx: exact_sum(ctx, range(13), add, bound, (257,), block))
    for got in many:
        assert torch.equal(got, one)
    # As close to the float64 sum as float64 itself: 13 terms, each rounded once on either side.
    reference = torch.stack(terms).sum(0)
    assert (one - reference).abs().max().item() <= 13 * bound * 2.0 ** -52
    # What the exact sum is for: the same partial sums added in float64 by rank do not agree.
    naive = {w: sum(torch.stack([terms[k] for k in shard(13, r, w)]).sum(0) for r in range(w))
             for w in (1, world_size)}
    assert not torch.equal(naive[1], naive[world_size])


def test_each_rank_builds_only_its_share_of_the_terms():
    group = Group(4)
    built: list[list[int]] = [[] for _ in range(4)]

    def fn(ctx: Ctx) -> torch.Tensor:
        def add(k: int, out: torch.Tensor) -> None:
            built[ctx.rank].append(k)
            out.add_(float(k))
        return exact_sum(ctx, [5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29], add, 300.0, (3,))

    out = group.run(fn)
    # Blocks of four by position ([5..11], [13..19], [21..27], [29]), one rank each.
    assert built == [[5, 7, 9, 11], [13, 15, 17, 19], [21, 23, 25, 27], [29]]
    assert all(torch.equal(o, torch.full((3,), 221.0, dtype=torch.float64)) for o in out)


def test_noise_sum_matches_the_float64_sum_and_skips_zero_weights():
    seeds, weights = [11, 12, 13, 14, 15], [0.25, 0.0, -0.5, 0.125, 0.0]
    calls = Group(1).run(lambda ctx: noise_sum(ctx, seeds, weights, 1000))[0]
    reference = sum(w * noise(s, 1000).to(torch.float64) for s, w in zip(seeds, weights))
    assert (calls - reference).abs().max().item() < 1e-12
    two = Group(2).run(lambda ctx: noise_sum(ctx, seeds, weights, 1000))
    assert torch.equal(two[0], calls) and torch.equal(two[1], calls)
    # The noise generator stays inside the bound the grid is built for.
    assert noise(0, 1_000_000).abs().max().item() < NOISE_BOUND


def test_a_term_beyond_the_bound_is_an_error():
    with pytest.raises(RuntimeError, match="above the stated bound"):
        Group(1).run(lambda ctx: exact_sum(ctx, [0, 1], lambda k, out: out.add_(3.0), 5.0,
                                           (2,), block=1))


def test_global_max_is_the_largest_of_the_ranks():
    assert Group(3).run(lambda ctx: global_max(ctx, float(ctx.rank) * 1.5)) == [3.0, 3.0, 3.0]


# ---------------------------------------------------------------------------------- noise table
def test_noise_table_is_the_same_everywhere_and_serves_slices():
    from unitrain.rules.population.service import NoiseTable, noise_source

    table = NoiseTable(200_003)
    again = NoiseTable(200_003)  # a second process of the machine maps the same file
    assert table.path == again.path and torch.equal(table.data, again.data)
    first = torch.randn(200_003, generator=torch.Generator().manual_seed(NoiseTable._SEED))
    assert torch.equal(table.data, first)  # one chunk: exactly torch.randn of the table's seed
    with noise_source(table):
        got = noise(123_456_789, 1000, torch.float64)
        got.add_(1.0)  # a caller's in-place change never reaches the table
        assert torch.equal(noise(123_456_789, 1000, torch.float64) + 1.0, got)
    offset = 123_456_789 % (200_003 - 1000 + 1)
    assert torch.equal(got - 1.0, table.data[offset: offset + 1000].to(torch.float64))
    # Outside the block, noise is regenerated from the seed again.
    assert not torch.equal(noise(123_456_789, 1000, torch.float64), got - 1.0)


def test_noise_source_auto_reads_a_table_for_large_networks_only():
    import unitrain as ut
    from unitrain.rules.population.service import TABLE_FROM, noise_table

    es = ut.optim.ES(noise_table_size=300_000)
    assert noise_table(es, TABLE_FROM - 1) is None
    assert noise_table(es, TABLE_FROM).size == 300_000
    assert noise_table(ut.optim.ES(noise_source="seeds"), 10 * TABLE_FROM) is None
    assert noise_table(ut.optim.ES(noise_source="table", noise_table_size=5_000), 10).size == 5_000
    assert noise_table(ut.optim.ES(noise_source="table", noise_table_size=5_000), 7_000).size == 7_000


def test_bad_noise_source_names_the_key():
    import unitrain as ut
    from unitrain.errors import ConfigError

    with pytest.raises(ConfigError, match="noise_source.*one of auto, seeds, table"):
        ut.optim.ES(noise_source="file")
