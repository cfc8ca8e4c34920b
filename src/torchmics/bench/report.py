"""Bench outputs: results.jsonl (append-only), a markdown table and a bar chart of tokens/s per GPU."""

from __future__ import annotations

import json
from pathlib import Path

from torchmics.tables import markdown_table, read_jsonl


def _setting(r: dict) -> str:
    where = f"{r['nodes']} emulated nodes x {r['gpus_per_node']}" if r.get("emulated") else f"{r['nodes'] * r['gpus_per_node']} GPU(s), 1 node"
    replica = f" ({r['replica_reduce_dtype']} replica hop)" if r.get("replica_reduce_dtype") else ""
    compiled = ", compiled" if r.get("compiled") else ""
    return f"{where}, accum {r['accum']}, {r['reduce_dtype']} reduce{replica}{compiled}"


def _profile_cell(r: dict) -> str:
    """compute / communication / exposed seconds of the profiled step, when there was one on a GPU."""
    p = r.get("profile") or {}
    return f"{p['compute_s']:.2f} / {p['comm_s']:.2f} / {p['exposed_s']:.2f}" if "compute_s" in p else "-"


def _run_row(r: dict) -> list[object]:
    if r.get("status") != "ok":
        error = r.get("error", "").splitlines()[-1][:80] if r.get("error") else ""
        return [_setting(r), r["system"], r["partition_size"], "-", "-", "-", "-", "-", f"failed: {error}"]
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
    return [_setting(r), r["system"], r["partition_size"], f"{r['tokens_per_s_per_gpu']:,.0f}", mfu,
            f"{r['step_time_s']:.3f}", mem, _profile_cell(r), "ok"]


def results_table(records: list[dict]) -> str:
    """The training runs of ``records`` as a markdown table, then the collective measurements (if any) as another."""
    runs = [r for r in records if r.get("kind") != "collective"]
    tables = [markdown_table(["setting", "system", "partition", "tok/s/GPU", "MFU", "step s", "peak GiB",
                              "compute / comm / exposed s", "status"], [_run_row(r) for r in runs])]
    collectives = [r for r in records if r.get("kind") == "collective"]
    if collectives:
        tables.append(markdown_table(["op", "algo", "ranks", "nodes x GPUs", "MiB", "bus GB/s"],
                                     [[c["op"], c["algo"], c["ranks"], f"{c['nodes']}x{c['gpus_per_node']}",
                                       f"{c['bytes'] / 2**20:.0f}", f"{c['busbw_gbps']:.1f}"] for c in collectives]))
    return "\n\n".join(tables) + "\n"


def bar_chart(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return
    labels = [f"{r['system']} (p={r['partition_size']})\n{_setting(r)}" for r in ok]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(ok) + 1.5))
    ax.barh(range(len(ok)), [r["tokens_per_s_per_gpu"] for r in ok], color=["C0" if r["system"].startswith("torchmics") else "C7" for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s per GPU")
    ax.set_title(f"{ok[0]['model']} on {ok[0]['device']}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, new_records: list[dict]) -> None:
    """Append to results.jsonl, then redraw the table and chart from everything recorded there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in new_records)
    records = read_jsonl(out_dir / "results.jsonl", missing_ok=True)
    (out_dir / "results.md").write_text(results_table(records))
    bar_chart([r for r in records if r.get("kind") != "collective"], out_dir / "results.png")
