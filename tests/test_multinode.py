"""Two machines: ``torchrun --nnodes=2 --nproc-per-node=1`` on loopback (two node ranks), for ES
and GA. Both nodes end with the same parameters, equal to one process's, bit for bit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import child_env


SCRIPT = '''
import sys

import unitrain as ut
from dump import Dump
from policies import TinyPolicy

RULES = {
    "ga": lambda: ut.optim.GA(population=12, truncation=4, sigma=0.1, elite_candidates=3,
                              elite_episodes=2, max_episode_steps=60, novelty=0.5, novelty_k=3),
    "es": lambda: ut.optim.ES(population=12, sigma=0.1, lr=0.05, max_episode_steps=60),
}

if __name__ == "__main__":
    nodes = int(sys.argv[1])
    for name, make in RULES.items():
        trainer = ut.Trainer(env=ut.EnvSpec("CartPole-v1"), optimizer=make(), devices=1,
                             num_nodes=nodes, strategy="ddp" if nodes > 1 else "auto",
                             max_frames=1500, eval_every_frames=1, eval_episodes=2, seed=6,
                             num_threads=1, run_dir=f"run-{name}-{nodes}", logger=False,
                             callbacks=[Dump(f"{name}-{nodes}-")], enable_progress_bar=False)
        trainer.fit(TinyPolicy(4, 2))
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_by_torchrun_end_equal_to_one_process(tmp_path: Path):
    script = tmp_path / "nodes.py"
    script.write_text(SCRIPT)
    env = dict(child_env(), OMP_NUM_THREADS="1")
    port = _port()
    launches = [[sys.executable, str(script), "1"]] + [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
         str(script), "2"] for node in (0, 1)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for cmd in launches]
    for cmd, proc in zip(launches, procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{cmd[-4:]}: {err[-3000:]}"
    for rule in ("es", "ga"):
        one = torch.load(tmp_path / f"{rule}-1-rank0.pt", weights_only=False)
        nodes = [torch.load(tmp_path / f"{rule}-2-rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert one["world_size"] == 1 and [n["world_size"] for n in nodes] == [2, 2]
        assert one["frames"] == nodes[0]["frames"] == nodes[1]["frames"]
        assert any(not torch.equal(one["init"][k], one["params"][k]) for k in one["params"])
        for key, value in one["params"].items():
            for node in nodes:
                assert torch.equal(value, node["params"][key]), (rule, key)
