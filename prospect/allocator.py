"""The memory allocator setting a training process needs before PyTorch loads (the CLI sets it in
this process; `ray_launch` passes it to Ray workers in their environment)."""

from __future__ import annotations

import os

# Read by PyTorch at its first allocation, so set before torch is imported (the CLI does; Ray workers get it
# in their environment): tensors of 2 MiB and more then come from 2 MiB-aligned, huge-page-backed blocks.
# With glibc's heap alone, the memory freed between a step's activations stays fragmented and the peak RSS
# of a LoRA run on CPU is ~1.3× higher (benchmarks/README.md, "Memory"). A value the user set wins.
ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def set_allocator_env() -> None:
    for name, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(name, value)
