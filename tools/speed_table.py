"""The table the throughput benchmarks print: medians over rounds, relative to the raw loop."""

from __future__ import annotations

import statistics


def print_speed_table(title: str, wall: dict[str, list[float]], cpu: dict[str, list[float]],
                      baseline: str = "raw") -> tuple[dict[str, float], dict[str, float]]:
    """Print env-steps per second (wall and CPU) per path, as medians over the rounds.

    Args:
        title: the line above the table (env, sizes, rounds).
        wall: per path, env-steps per wall-clock second of each round.
        cpu: per path, env-steps per CPU-second of this process in each round (less sensitive
            than wall time to other processes competing for the cores).
        baseline: the path the ratios are taken against.

    Returns:
        The wall and CPU medians per path.
    """
    wall_med = {name: statistics.median(v) for name, v in wall.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"\n{title}")
    vs = "vs raw" if baseline == "raw" else "vs base"
    print(f"{'path':<10} {'env-steps/s':>12} {vs:>8} {'per CPU-s':>11} {vs:>8}")
    for name in wall:
        print(f"{name:<10} {wall_med[name]:>12,.0f} {wall_med[name] / wall_med[baseline]:>7.2f}x "
              f"{cpu_med[name]:>11,.0f} {cpu_med[name] / cpu_med[baseline]:>7.2f}x")
    return wall_med, cpu_med
