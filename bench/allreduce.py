"""Benchmark: how a step's gradients travel between ranks, for the hash grid's large table.

Two ranks (gloo on a CPU, NCCL with --gpus), each a step of the hash-grid radiance field on a batch of random
points (forward, backward, gradient sum), timed four ways: no exchange (the floor), recon's all-reduce of each
gradient in place (app.distributed.all_reduce_gradients) and torch's DistributedDataParallel (bucketed
all-reduces overlapped with the backward pass), also as recon would need it (find_unused_parameters). The table
sizes are the CPU preset's (8 levels, 2^17) and instant-ngp's (16 levels, 2^19).

    python bench/allreduce.py --out bench/results/allreduce-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from machine import describe
from torch.nn.parallel import DistributedDataParallel

from recon.app.distributed import all_reduce_gradients, join, leave
from recon.fields import build_field

TABLES = {"cpu preset (8 levels, 2^17)": {"levels": 8, "log2_table": 17},
          "instant-ngp (16 levels, 2^19)": {"levels": 16, "log2_table": 19}}


def timed_steps(step, repeats: int) -> float:
    """Median seconds of `step` over `repeats` (after two warm-up calls), every rank in step."""
    for _ in range(2):
        step()
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def rank_main(rank: int, port: int, points: int, repeats: int, gpus: bool, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    join("auto" if gpus else "cpu")
    device = torch.device(f"cuda:{rank}" if gpus else "cpu")
    generator = torch.Generator().manual_seed(rank)
    x = (torch.rand(points, 3, generator=generator) * 2 - 1).to(device)
    d = torch.nn.functional.normalize(torch.randn(points, 3, generator=generator), dim=-1).to(device)
    aabb = torch.tensor([[-1.0, -1, -1], [1, 1, 1]])
    rows = {}
    for name, options in TABLES.items():
        field = build_field("hashgrid", aabb, **options).to(device)
        params = list(field.parameters())

        def backward(module) -> None:
            for p in params:
                p.grad = None
            out = module(x, d)
            (out["rgb"].square().mean() + out["density"].mean()).backward()

        ddp = DistributedDataParallel(field)
        # What recon's steps would need of DDP: some parameters (the proposal fields, most steps) get no gradient.
        ddp_unused = DistributedDataParallel(field, find_unused_parameters=True)
        rows[name] = {
            "parameters": sum(p.numel() for p in params),
            "no exchange": timed_steps(lambda: backward(field), repeats),
            "recon (in place, one all-reduce a gradient)": timed_steps(
                lambda: (backward(field), all_reduce_gradients(params, [])), repeats),
            "DistributedDataParallel": timed_steps(lambda: backward(ddp), repeats),
            "DistributedDataParallel (find_unused_parameters)": timed_steps(lambda: backward(ddp_unused), repeats),
        }
    if rank == 0:
        out.write_text(json.dumps(rows))
    leave()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=2**15, help="samples a step on each rank")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--gpus", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scratch = Path(f"/tmp/allreduce-{os.getpid()}.json")
    torch.multiprocessing.spawn(rank_main, (port, args.points, args.repeats, args.gpus, scratch), nprocs=2)
    rows = json.loads(scratch.read_text())
    scratch.unlink()
    for name, row in rows.items():
        floor = row["no exchange"]
        print(f"{name}: {row['parameters']:,} parameters; a step {floor * 1e3:.1f} ms without exchange; "
              + "; ".join(f"{how} +{(row[how] - floor) * 1e3:.1f} ms" for how in
                          [key for key in row if key not in ("parameters", "no exchange")]))
    if args.out:
        args.out.write_text(json.dumps({
            "machine": describe(torch.device("cuda" if args.gpus else "cpu")) + ", 2 ranks x 1 thread",
            "date": time.strftime("%Y-%m-%d"), "points_per_rank": args.points, "seconds_per_step": rows},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
