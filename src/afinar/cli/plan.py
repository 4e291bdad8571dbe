"""`afinar plan`: what a run needs before it starts — memory part by part, the settings that fit a
budget, the time, and the cost on rented GPUs beside OpenAI's price for the same data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from afinar.cli.common import config_help, quiet_libraries
from afinar.console import console, out, user_errors


@user_errors
def plan(
    data: Optional[str] = typer.Option(None, help=config_help("data")),
    model: Optional[str] = typer.Option(None, help="Base model: a name, folder, .gguf, hub id "
                                        "(its config.json cached) or run directory."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    method: Optional[str] = typer.Option(None, help="lora or full (which weights train), or "
                                         "sft, dpo or orpo (what to optimise)."),
    quantization: Optional[str] = typer.Option(None, help="none, 4bit or 8bit (QLoRA)."),
    device: Optional[str] = typer.Option(None, "--device", help="Plan for a GPU of the table, "
                                         "e.g. \"RTX 3060 12GB\", A100, H100 (default: this "
                                         "machine, measured)."),
    max_memory: Optional[str] = typer.Option(None, help="Memory budget, e.g. 12GB (default: "
                                             "the device's)."),
    set_: List[str] = typer.Option([], "--set", help="Any training setting: key=value."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """Estimate a run's peak memory, the settings that fit, its time and its cost (no weights
    are loaded)."""
    from afinar.config import load_train_config, method_option
    from afinar.plan.run import plan_command

    quiet_libraries()
    cfg = load_train_config(config, set_, data=data, model=model, **method_option(method),
                            quantization=quantization, max_memory=max_memory)
    result = plan_command(cfg, device, notify=lambda m: console.print(f"[dim]{m}[/]"))
    if as_json:
        out.print_json(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print_plan(result)
    raise typer.Exit(0 if result.fits else 1)


def _mb(value: float) -> str:
    return f"{value / 1024:,.2f} GB" if value >= 1024 else f"{value:,.0f} MB"


def print_plan(plan) -> None:
    from rich.table import Table

    from afinar.plan.planner import duration

    d = plan.to_dict()
    m, data = d["model"], d["data"]
    out.print(f"[bold]{m['name']}[/] ({m['architecture']}, {m['parameters'] / 1e9:.2f} B "
              f"parameters), {m['method']}"
              + (f" {m['quantization']}" if m["quantization"] != "none" else "")
              + f", {d['precision']}; {m['trainable_parameters']:,} trained")
    out.print(f"data: {data['train_examples']} examples, {data['tokens_per_epoch']:,} tokens per "
              f"epoch (longest {data['longest_example']}), {data['epochs']:g} epoch(s)")
    table = Table(title=f"Memory on {d['target']['name']}", title_justify="left")
    table.add_column("part")
    table.add_column("no checkpointing", justify="right")
    table.add_column("checkpointing", justify="right")
    off, on = d["memory_mb"]["without_checkpointing"], d["memory_mb"]["with_checkpointing"]
    for part in off:  # the parts, then the total (plan/memory.py MemoryParts)
        table.add_row(part, _mb(off[part]), _mb(on[part]),
                      style="bold" if part == "total" else None)
    out.print(table)
    s = d["settings"]
    verdict = "[green]fits[/]" if d["fits"] else "[red]does not fit[/]"
    out.print(f"peak ≈ {_mb(d['peak_memory_mb'])} of {_mb(d['budget_mb'])}: {verdict} with "
              f"batch_size={s['batch_size']}, gradient_accumulation_steps="
              f"{s['gradient_accumulation_steps']}, gradient_checkpointing="
              f"{str(s['gradient_checkpointing']).lower()}")
    for alt in d["alternatives"]:
        out.print(f"  fits: batch_size={alt['batch_size']} gradient_accumulation_steps="
                  f"{alt['gradient_accumulation_steps']} gradient_checkpointing="
                  f"{str(alt['gradient_checkpointing']).lower()} quantization="
                  f"{alt['quantization']} (≈ {_mb(alt['peak_memory_mb'])})")
    for note in d["notes"]:
        out.print(f"  note: {note}")
    t = d["time"]
    if "efficiency" in t:  # from the matmul peak (a GPU)
        source = (f"{t['throughput_source']}: {d['target']['tflops']} TFLOP/s, "
                  f"{t['efficiency']:.0%} of it; {t['flops_per_token'] / 1e9:.2f} GFLOP per token")
    else:  # from a training step measured on this machine
        source = t["throughput_source"] + ("; compiled layers" if t.get("compiled") else "")
    out.print(f"time ≈ {duration(t['train_seconds'])} training + "
              f"{duration(t['eval_seconds'])} held-out evaluation at ≈ {t['tokens_per_s']:,} "
              f"tokens/s ({source})")
    cost = Table(title="Cost of this run (edit the prices: AFINAR_HOME/hardware.yaml)",
                 title_justify="left")
    for column in ("GPU", "memory", "fits", "time", "USD/h", "USD"):
        cost.add_column(column, justify="left" if column == "GPU" else "right")
    for gpu in d["cost"]["gpus"]:
        cost.add_row(gpu["gpu"], f"{gpu['memory_gb']} GB", "yes" if gpu["fits"] else "no",
                     duration(gpu["seconds"]), f"{gpu['price_per_hour']:.2f}",
                     f"{gpu['usd']:.4f}" if gpu["usd"] < 0.01 else f"{gpu['usd']:.2f}")
    out.print(cost)
    openai = ", ".join(f"{k} ${v:,.2f}" for k, v in d["cost"]["openai_usd"].items())
    out.print(f"OpenAI fine-tuning for the same data ({d['cost']['openai_billed_tokens']:,} "
              f"billed tokens): {openai}")

