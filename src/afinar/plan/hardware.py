"""Where a plan runs: a GPU from the table (plan/hardware.yaml, editable), or this machine,
whose memory is read and whose matmul throughput is measured with a short probe.

    target = find_target("RTX 3060 12GB")     # from the table
    target = this_machine(torch.device("cpu"), "fp32")   # measured here
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from afinar.errors import AfinarError
from afinar.paths import afinar_home

_TABLE = Path(__file__).with_name("hardware.yaml")


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "cpu" | "cuda" (this machine) | "gpu" (from the table)
    memory_bytes: int
    tflops: float  # the compute dtype's matmul peak (measured here, or the datasheet's)
    measured: bool
    price_per_hour: float | None = None
    bf16: bool = True
    notes: list[str] = field(default_factory=list)


def user_table_path() -> Path:
    return afinar_home() / "hardware.yaml"


@lru_cache(maxsize=4)
def _read_tables(user_file: str, mtime: float) -> dict:
    table = yaml.safe_load(_TABLE.read_text(encoding="utf-8"))
    path = Path(user_file)
    if path.is_file():
        try:
            extra = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise AfinarError(f"{path}: not valid YAML: {exc}") from None
        names = {g["name"].lower(): i for i, g in enumerate(table["gpus"])}
        for gpu in extra.get("gpus", []) or []:
            if gpu.get("name", "").lower() in names:
                table["gpus"][names[gpu["name"].lower()]].update(gpu)
            else:
                table["gpus"].append(gpu)
        table["mfu"].update(extra.get("mfu", {}) or {})
        table["openai_training_per_million_tokens"].update(
            extra.get("openai_training_per_million_tokens", {}) or {})
    return table


def hardware_table() -> dict:
    user = user_table_path()
    return _read_tables(str(user), user.stat().st_mtime if user.is_file() else 0.0)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def find_target(name: str) -> Target:
    """A GPU of the table by name or alias, forgiving case, spaces and dashes."""
    wanted = _key(name)
    gpus = hardware_table()["gpus"]
    for gpu in gpus:
        keys = [_key(gpu["name"])] + [_key(str(a)) for a in gpu.get("aliases", [])]
        if wanted in keys:
            return Target(gpu["name"], "gpu", int(gpu["memory_gb"] * 2**30), float(gpu["tflops"]),
                          False, gpu.get("price_per_hour"), bool(gpu.get("bf16", True)))
    close = [g["name"] for g in gpus if wanted and (wanted in _key(g["name"])
                                                    or _key(g["name"]).startswith(wanted[:4]))]
    raise AfinarError(f"unknown GPU {name!r}" + (f" (did you mean {', '.join(close)}?)"
                                                 if close else ""),
                      "known: " + ", ".join(g["name"] for g in gpus) + f"; add yours to "
                      f"{user_table_path()}, or give --max-memory")


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file, in bytes; None where /proc does not have it."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_cpu_memory() -> int:
    """MemAvailable: what a new allocation can get without swapping."""
    found = _proc_bytes("/proc/meminfo", "MemAvailable")
    return found if found is not None else (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def process_rss() -> int:
    """This process's resident memory now: on a CPU the baseline every run starts from."""
    found = _proc_bytes("/proc/self/status", "VmRSS")
    if found is not None:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_tflops(device, dtype, rows: int = 512, inner: int = 1024, cols: int = 2048,
                   seconds: float = 0.4) -> float:
    """Matmul throughput of `device` in `dtype` at shapes like a training step's, in TFLOP/s.
    Short (about half a second): a plan must not cost a noticeable share of the run."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # A small matmul first: where the dtype is slow (bf16 on a CPU without native bf16 runs
    # below 1 GFLOP/s) the probe shrinks its rows so that it still takes about `seconds`.
    small = torch.randn(16, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    small @ b  # the first call pays one-time set-up
    sync()
    start = time.perf_counter()
    small @ b
    sync()
    per_row = (time.perf_counter() - start) / 16
    rows = max(1, min(rows, int(seconds / 8 / max(per_row, 1e-9))))
    a = torch.randn(rows, inner, device=device).to(dtype)
    a @ b
    sync()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if count % 4 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - start
    return 2 * rows * inner * cols * count / elapsed / 1e12


def this_machine(device, precision: str) -> Target:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tflops = measure_tflops(device, dtype)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, _ = torch.cuda.mem_get_info(device)
        return Target(props.name, "cuda", int(free), tflops, True,
                      bf16=torch.cuda.is_bf16_supported())
    from afinar.models.load import cpu_has_fast_bf16

    return Target(f"this CPU ({os.cpu_count()} cores)", "cpu", available_cpu_memory(), tflops,
                  True, bf16=cpu_has_fast_bf16())
