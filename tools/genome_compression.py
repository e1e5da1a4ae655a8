"""Size of a Deep GA genome against the parameters it encodes.

Such et al. 2017 ("Deep Neuroevolution") store a genome as its initialisation seed plus one
``(seed, σ)`` per generation, and report encodings up to 10,000-fold smaller than the parameter
vector. This prints that ratio for :class:`unitrain.policy.models.NatureCNN` (the paper's Atari network)
after ``--generations`` mutations, using :class:`unitrain.rules.population.ga.Genome`'s byte encoding,
and checks that the genome rebuilds the parameters bit for bit. Run::

    python tools/genome_compression.py --generations 100
"""

from __future__ import annotations

import argparse
import time

import torch

from unitrain.policy.models import NatureCNN
from unitrain.rules.population.ga import Genome, fresh_init
from unitrain.rules.population.service import ParamLayout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generations", type=int, default=100, help="mutations in the chain")
    parser.add_argument("--actions", type=int, default=18, help="outputs of the network")
    parser.add_argument("--population", type=int, default=1000,
                        help="individuals, for the size of a whole population's checkpoint")
    parser.add_argument("--sigma", type=float, default=0.002, help="mutation σ")
    args = parser.parse_args()
    torch.set_num_threads(1)

    module = NatureCNN((4, 84, 84), args.actions)
    layout = ParamLayout.of(module)
    init = fresh_init(module, layout)
    genome = Genome(12345)
    for g in range(args.generations):
        genome = genome.mutate(1_000_003 * (g + 1) % (2**31 - 1), args.sigma)

    start = time.perf_counter()
    first = genome.build(init)
    rebuild_s = time.perf_counter() - start
    again = Genome.from_bytes(genome.to_bytes()).build(init)
    param_bytes = layout.numel * first.element_size()
    genome_bytes = len(genome.to_bytes())
    print(f"network: NatureCNN, {args.actions} actions, {layout.numel:,} parameters "
          f"({first.dtype})")
    print(f"parameter bytes:            {param_bytes:>12,}")
    print(f"genome bytes ({args.generations} generations): {genome_bytes:>7,}  "
          f"(8-byte init seed + 8 bytes per mutation)")
    print(f"compression:                {param_bytes / genome_bytes:>12,.0f}x")
    print(f"population of {args.population:,}: {args.population * param_bytes / 2**20:,.0f} MiB as "
          f"parameters, {args.population * genome_bytes / 2**10:,.0f} KiB as genomes")
    print(f"rebuild from seeds: {rebuild_s:.2f} s; bit-identical after a byte round trip: "
          f"{torch.equal(first, again)}")


if __name__ == "__main__":
    main()
