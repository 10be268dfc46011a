"""The harness's Markdown table, ratios against the issue's targets, and the throughput-vs-batch PNG."""

from __future__ import annotations

from pathlib import Path

TARGETS = {
    "ort_cpu_vs_torch_cpu": 1.5,  # onnxruntime CPU / torch eager CPU throughput, at least
    "int8_vs_fp32": 1.8,  # onnxruntime CPU INT8 / FP32 throughput at batch 8 and 32, at least
    "cold_start": 1 / 5,  # runtime / torch, at most
    "peak_rss": 1 / 4,
    "env_size": 1 / 20,
}


def _rows(results: dict) -> dict[str, dict[int, dict]]:
    """backend -> batch size -> result row (timed rows only)."""
    out: dict[str, dict[int, dict]] = {}
    for entry in results["backends"]:
        for row in entry.get("results", []):
            if "throughput_pairs_per_s" in row:
                out.setdefault(entry["backend"], {})[row["batch_size"]] = row
    return out


def _torch_cpu_name(results: dict) -> str | None:
    for entry in results["backends"]:
        if entry["backend"] == "torch-eager-fp32-cpu" or (
            entry["backend"] == "torch-eager-fp32" and entry.get("device") == "cpu"
        ):
            return entry["backend"]
    return None


def ratios(results: dict) -> dict:
    """Throughput ratios per batch size that the targets name, plus the footprint ratios."""
    rows = _rows(results)
    out: dict = {}
    base = _torch_cpu_name(results)
    if base and "ort-cpu" in rows:
        out["ort_cpu_vs_torch_cpu"] = {
            n: rows["ort-cpu"][n]["throughput_pairs_per_s"] / rows[base][n]["throughput_pairs_per_s"]
            for n in rows["ort-cpu"]
            if n in rows.get(base, {})
        }
    if "ort-cpu-int8" in rows and "ort-cpu" in rows:
        out["int8_vs_fp32"] = {
            n: rows["ort-cpu-int8"][n]["throughput_pairs_per_s"]
            / rows["ort-cpu"][n]["throughput_pairs_per_s"]
            for n in rows["ort-cpu-int8"]
            if n in rows["ort-cpu"]
        }
    for ref in ("torch-eager-fp32", "torch-amp-fp16"):
        if "trt-fp16" in rows and ref in rows and ref != base:
            out[f"trt_vs_{ref}"] = {
                n: rows["trt-fp16"][n]["throughput_pairs_per_s"] / rows[ref][n]["throughput_pairs_per_s"]
                for n in rows["trt-fp16"]
                if n in rows[ref]
            }
    fp = results.get("footprint", {})
    if "cold_start" in fp:
        out["cold_start"] = fp["cold_start"]["cold_start_ratio"]
        out["peak_rss"] = fp["cold_start"]["peak_rss_ratio"]
    if "cold_start_int8" in fp:
        out["peak_rss_int8"] = fp["cold_start_int8"]["peak_rss_ratio"]
    if "env_size" in fp:
        out["env_size"] = fp["env_size"]["ratio"]
    return out


def _verdict(key: str, value: float) -> str:
    target = TARGETS[key]
    ok = value >= target if key in ("ort_cpu_vs_torch_cpu", "int8_vs_fp32") else value <= target
    return "meets" if ok else "MISSES"


def markdown(results: dict) -> str:
    env, torch_env = results["environment"], results["environment"].get("torch", {})
    gpu = (
        f", GPU {torch_env['cuda_device']} (sm {torch_env['compute_capability']})"
        if "cuda_device" in torch_env
        else ""
    )
    settings = results["settings"]
    timed = (
        f"{settings['iterations']} timed calls"
        if settings["iterations"]
        else f"{settings['duration_s']:g} s (at least {settings['min_iterations']} calls)"
    )
    lines = [
        f"Run {results['created']}: `{results['command']}`",
        "",
        f"Model: {results['model']['backbone']} @ {results['model']['image_size']} px dual-branch fusion, "
        f"{results['model']['weights']}. Machine: {env.get('cpu')} x {env.get('cpu_count')} CPUs"
        + gpu
        + f"; python {env.get('python')}, torch {torch_env.get('torch')} "
        + f"({torch_env.get('threads')} threads), "
        + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        + ".",
        "",
        "Engine-only: numpy uint8 in, numpy float32 logits out (host<->device copies included on GPU), "
        f"synthetic inputs, {settings['warmup']} warm-up calls then {timed} per batch size.",
        "",
        "| backend | device | precision | batch | p50 ms | p99 ms | ms/pair (p50) | pairs/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    skipped = []
    for entry in results["backends"]:
        if "skipped" in entry:
            skipped.append(f"- {entry['backend']}: skipped, {entry['skipped']}")
            continue
        for row in entry["results"]:
            if "skipped" in row:
                skipped.append(f"- {entry['backend']} batch {row['batch_size']}: skipped, {row['skipped']}")
                continue
            b, p = row["latency"]["per_batch"], row["latency"]["per_pair"]
            lines.append(
                f"| {entry['backend']} | {entry['device']} | {entry['precision']} | {row['batch_size']} | "
                f"{b['median_ms']:.2f} | {b['p99_ms']:.2f} | {p['median_ms']:.3f} | "
                f"{row['throughput_pairs_per_s']:.1f} |"
            )
    if skipped:
        lines += ["", "Not run here:", *skipped]
    lines += ["", "Ratios against the targets:", ""]
    r = ratios(results)
    if "ort_cpu_vs_torch_cpu" in r:
        per = ", ".join(f"batch {n}: {v:.2f}x" for n, v in r["ort_cpu_vs_torch_cpu"].items())
        best = max(r["ort_cpu_vs_torch_cpu"].values(), default=float("nan"))
        lines.append(f"- onnxruntime CPU / torch eager CPU throughput: {per} (target >= 1.5x; best "
                     f"{best:.2f}x {_verdict('ort_cpu_vs_torch_cpu', best)})")  # fmt: skip
    if results.get("paired_cpu"):
        per = ", ".join(f"batch {row['batch_size']}: {row['ratio']:.2f}x" for row in results["paired_cpu"])
        best = max(row["ratio"] for row in results["paired_cpu"])
        lines.append(
            f"- same, interleaved A/B ({results['paired_cpu'][0]['rounds']} rounds, "
            f"{results['settings'].get('paired_threads', 'default')} threads, robust to load drift on"
            f" a shared machine): {per} (best {best:.2f}x {_verdict('ort_cpu_vs_torch_cpu', best)})"
        )
    if "int8_vs_fp32" in r:
        per = ", ".join(f"batch {n}: {v:.2f}x" for n, v in r["int8_vs_fp32"].items())
        lines.append(f"- onnxruntime CPU INT8 / FP32 throughput: {per} (target >= 1.8x at batch 8 and 32)")
    paired_int8 = results.get("paired_int8")
    if isinstance(paired_int8, dict):
        lines.append(f"- INT8 / FP32 interleaved: skipped, {paired_int8['skipped']}")
    elif paired_int8:
        per = ", ".join(
            f"batch {row['batch_size']}: {row['ratio']:.2f}x ({row['a_pairs_per_s']:.1f} vs "
            f"{row['b_pairs_per_s']:.1f} pairs/s, {_verdict('int8_vs_fp32', row['ratio'])})"
            for row in paired_int8
        )
        lines.append(
            f"- same, interleaved A/B ({paired_int8[0]['rounds']} rounds, median call time): {per} "
            "(target >= 1.8x)"
        )
    for key in (k for k in r if k.startswith("trt_vs_")):
        per = ", ".join(f"batch {n}: {v:.2f}x" for n, v in r[key].items())
        lines.append(f"- TensorRT FP16 / {key.removeprefix('trt_vs_')}: {per}")
    if "end_to_end" in results:
        e = results["end_to_end"]
        lines.append(
            f"- end-to-end from a folder ({e['pairs']} pairs, {e['backend']}, batch {e['batch_size']}, "
            f"{e['decode_workers']} decode workers): {e['end_to_end_pairs_per_s']:.1f} pairs/s vs "
            f"engine-only {e['engine_only_pairs_per_s']:.1f} -> {e['ratio']:.2f}"
            " (GPU target >= 0.9 at batch 64)"
        )
    fp = results.get("footprint", {})
    if "cold_start" in fp:
        cs = fp["cold_start"]
        rt, th = cs["runtime"], cs["torch"]
        lines.append(
            f"- cold start (process start -> first prediction written, {cs.get('pairs', '?')} pair, "
            f"to exit): crc-infer {rt['wall_s_median']:.2f} s, torch {th['wall_s_median']:.2f} s "
            f"-> {r['cold_start']:.2f} (target <= 0.20, {_verdict('cold_start', r['cold_start'])})"
        )
        lines.append(
            f"- peak RSS of that job: crc-infer {rt['peak_rss_mib']:.0f} MiB, torch {th['peak_rss_mib']:.0f} "
            f"MiB -> {r['peak_rss']:.2f} (target <= 0.25, {_verdict('peak_rss', r['peak_rss'])})"
        )
    if "cold_start_int8" in fp:
        cs = fp["cold_start_int8"]
        label = "the same one-pair job on model.int8.onnx"
        lines.append(
            _side_by_side(label, ("crc-infer", "torch"), cs, cs["cold_start_ratio"], r["peak_rss_int8"])
            + f" (RSS target <= 0.25, {_verdict('peak_rss', r['peak_rss_int8'])})"
        )
    if "folder_job" in fp:
        fj = fp["folder_job"]
        label = f"the same for all {fj['pairs']} example pairs in one batch"
        lines.append(
            _side_by_side(label, ("crc-infer", "torch"), fj, fj["cold_start_ratio"], fj["peak_rss_ratio"])
        )
    if "imports_only" in fp:
        io = fp["imports_only"]
        label = "imports alone (library overhead, no model)"
        names = ("runtime", "torch + torchvision")
        lines.append(_side_by_side(label, names, io, io["wall_ratio"], io["rss_ratio"]))
    if "env_size" in fp:
        es = fp["env_size"]
        lines.append(
            f"- installed size (site-packages): runtime env {es['runtime_env']['mib']:.0f} MiB, torch env "
            f"{es['torch_env']['mib']:.0f} MiB -> {r['env_size']:.3f} "
            f"(target <= 0.05, {_verdict('env_size', r['env_size'])})"
        )
    if "skipped" in fp:
        lines.append(f"- footprint: skipped, {fp['skipped']}")
    return "\n".join(lines) + "\n"


def _side_by_side(
    label: str, names: tuple[str, str], entry: dict, time_ratio: float, rss_ratio: float
) -> str:
    """``- label: A 0.15 s / 56 MiB, B 2.89 s / 795 MiB -> time 0.05, RSS 0.07`` for a footprint entry."""
    (rt, th), (rt_name, th_name) = (entry["runtime"], entry["torch"]), names
    return (
        f"- {label}: {rt_name} {rt['wall_s_median']:.2f} s / {rt['peak_rss_mib']:.0f} MiB, "
        f"{th_name} {th['wall_s_median']:.2f} s / {th['peak_rss_mib']:.0f} MiB "
        f"-> time {time_ratio:.2f}, RSS {rss_ratio:.2f}"
    )


def plot(results: dict, path: Path) -> None:
    """Throughput (pairs/s, log) against batch size (log2), one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in _rows(results).items():
        sizes = sorted(rows)
        ax.plot(sizes, [rows[n]["throughput_pairs_per_s"] for n in sizes], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("pairs / s (engine only)")
    model = results["model"]
    ax.set_title(f"{model['backbone']} @ {model['image_size']} px fusion, {results['created'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
