#!/usr/bin/env python3
"""Writes gpu-check.md (and summary.json) from what tools/gpu/run.sh left in its output folder:
parts.tsv (part, status, exit code, seconds, note) and gpu.txt (nvidia-smi's one-line facts)
in STATE_DIR (default OUT_DIR), ours-parity.json and ours-bench.json (`controlnet-serve device-check --json`), diffusers.json
(tools/gpu/diffusers_bench.py). Any of them may be missing or broken: the table says so.
Standard library only. Usage: report.py OUT_DIR [STATE_DIR]
"""

import json
import sys
from pathlib import Path


def load(path: Path):
    """(object, problem): the JSON in `path`, or None and why not."""
    if not path.exists():
        return None, "missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"unreadable: {e}"


def num(x, fmt):
    return "–" if x is None else format(x, fmt)


def gib(x):
    return "–" if x is None else f"{x / 2**30:.2f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main() -> int:
    out = Path(sys.argv[1])
    state = Path(sys.argv[2]) if len(sys.argv) > 2 else out
    lines = ["# GPU check", ""]
    summary = {"parts": [], "ok": True}

    gpu = (state / "gpu.txt").read_text().strip() if (state / "gpu.txt").exists() else ""
    summary["gpu"] = gpu or None
    if gpu:
        lines += [f"GPU (nvidia-smi: name, driver, memory, compute capability): {gpu}", ""]

    # Parts: what ran, how it ended.
    lines += ["## Parts", "", "| part | status | exit | seconds | note |", "|---|---|---|---|---|"]
    parts_file = state / "parts.tsv"
    if parts_file.exists():
        for row in parts_file.read_text().splitlines():
            name, status, rc, seconds, note = (row.split("\t") + [""] * 5)[:5]
            summary["parts"].append(
                {"part": name, "status": status, "exit": rc, "seconds": seconds, "note": note}
            )
            summary["ok"] &= status != "FAIL"
            lines.append(f"| {cell(name)} | {status} | {rc} | {seconds} | {cell(note)} |")
    lines.append("")

    parity, parity_err = load(out / "ours-parity.json")
    ours_run, ours_err = load(out / "ours-bench.json")
    theirs, theirs_err = load(out / "diffusers.json")

    # Which libraries did the work.
    libs = []
    for report in (parity, ours_run):
        if isinstance(report, dict):
            libs += [l for l in report.get("libraries", []) if l not in libs]
    if libs:
        lines += ["CUDA libraries mapped by controlnet-serve: " + ", ".join(f"`{l}`" for l in libs), ""]

    # Parity.
    lines += ["## Parity (controlnet-serve on the device vs diffusers' f32 images, tiny pipeline)", ""]
    rows = parity.get("parity") if isinstance(parity, dict) else None
    if rows:
        lines += ["| dtype | scheduler | PSNR dB | bound dB | ok |", "|---|---|---|---|---|"]
        for r in rows:
            ok = "ok" if r.get("ok") else "**FAIL**" + (f" ({cell(r['error'])})" if r.get("error") else "")
            lines.append(
                f"| {r.get('dtype')} | {r.get('scheduler')} | {num(r.get('psnr_db'), '.2f')} "
                f"| {num(r.get('bound_db'), '.1f')} | {ok} |"
            )
        summary["parity_ok"] = all(r.get("ok") for r in rows)
    else:
        lines.append(f"No parity results (ours-parity.json: {parity_err or 'no `parity` rows'}).")
    if isinstance(parity, dict) and parity.get("error"):
        lines += ["", f"device-check (parity) error: {cell(parity['error'])}"]
    lines.append("")

    # Bench.
    ours = ours_run.get("bench") if isinstance(ours_run, dict) else None
    ours = ours if isinstance(ours, dict) else {}
    theirs = theirs if isinstance(theirs, dict) else {}
    ref = ours or theirs
    lines += [
        "## Speed and memory ("
        + ", ".join(
            f"{k} {ref.get(k)}" for k in ("model", "dtype", "size", "steps") if ref.get(k) is not None
        )
        + "; UniPC, one ControlNet, CFG 7.5, random weights)",
        "",
        f"ours: {ours.get('impl', '–')}"
        + (f" (candle {ours_run['candle']})" if isinstance(ours_run, dict) and ours_run.get("candle") else "")
        + (f" ({ours_err})" if ours_err else ""),
        f"diffusers: {theirs.get('impl', '–')}" + (f" ({theirs_err})" if theirs_err else ""),
        "",
    ]
    if ref.get("model") == "tiny":
        lines.append("Tiny models (a dry run): each side has its own tiny model, so the ratios mean nothing.")
    for k in ("model", "dtype", "size", "steps"):
        if ours and theirs and ours.get(k) != theirs.get(k):
            lines.append(f"**Warning**: {k} differs: ours {ours.get(k)}, diffusers {theirs.get(k)}.")
    for name, r in (("ours", ours), ("diffusers", theirs)):
        if r.get("error"):
            lines.append(f"{name} bench error: {cell(r['error'])}")
    if isinstance(ours_run, dict) and ours_run.get("error") and not ours.get("error"):
        lines.append(f"device-check (bench) error: {cell(ours_run['error'])}")
    lines.append("")

    s_ours, s_theirs = ours.get("step_seconds"), theirs.get("step_seconds")
    lines += [
        "| | ours | diffusers | ours/diffusers |",
        "|---|---|---|---|",
        f"| step seconds (ControlNet + UNet, batch 2) | {num(s_ours, '.4f')} | {num(s_theirs, '.4f')} | {ratio(s_ours, s_theirs)} |",
        "",
    ]
    by_batch = {}
    for key, r in (("ours", ours), ("diffusers", theirs)):
        for row in r.get("pipeline") or []:
            by_batch.setdefault(row.get("batch"), {})[key] = row
    summary["bench"] = []
    if by_batch:
        lines += [
            "| batch | ours s/image | diffusers s/image | ours/diffusers | ours images/s | diffusers images/s "
            "| ours peak GiB | diffusers peak GiB | diffusers torch max allocated GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for b in sorted(by_batch, key=lambda x: (x is None, x)):
            o, t = by_batch[b].get("ours", {}), by_batch[b].get("diffusers", {})
            lines.append(
                f"| {b} | {num(o.get('seconds_per_image'), '.3f')} | {num(t.get('seconds_per_image'), '.3f')} "
                f"| {ratio(o.get('seconds_per_image'), t.get('seconds_per_image'))} "
                f"| {num(o.get('images_per_second'), '.2f')} | {num(t.get('images_per_second'), '.2f')} "
                f"| {gib(o.get('peak_device_memory_bytes'))} | {gib(t.get('peak_device_memory_bytes'))} "
                f"| {gib(t.get('torch_max_memory_allocated_bytes'))} |"
            )
            summary["bench"].append(
                {
                    "batch": b,
                    "ours_seconds_per_image": o.get("seconds_per_image"),
                    "diffusers_seconds_per_image": t.get("seconds_per_image"),
                    "ours_peak_device_memory_bytes": o.get("peak_device_memory_bytes"),
                    "diffusers_peak_device_memory_bytes": t.get("peak_device_memory_bytes"),
                }
            )
        lines += [
            "",
            "ours/diffusers below 1: we are faster. Peak = device-wide used memory (total − free, CUDA "
            "context included) polled every ~5 ms during the run, the same way on both sides.",
        ]
    else:
        lines.append("No pipeline rows from either side.")
    if ours.get("finite_outputs") is False:
        lines += ["", "Note: some of our final latents were not finite (random weights in f16); timing stands."]
    lines.append("")
    summary["step_seconds"] = {"ours": s_ours, "diffusers": s_theirs}

    failed = [p["part"] for p in summary["parts"] if p["status"] == "FAIL"]
    lines.append("**Result: " + ("all parts passed**" if not failed else f"FAILED: {', '.join(failed)}**"))
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
