"""The machine line every benchmark result records: processor, threads, torch, and the GPU when there is one."""

from __future__ import annotations

import platform

import torch


def describe(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}{gpu}"
