"""The text ``mrfm bench`` prints from its report (``--json`` prints the report itself)."""

from __future__ import annotations

from typing import Any

from .bench_stages import STAGES


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"mrfm bench — {report['archive']['source']}, backend {report['backend']}",
        "",
        "stage        seconds   series/s",
    ]
    for name in STAGES:
        s = report["stages"][name]
        lines.append(
            f"{name:<12} {s['seconds']:>7.3f}   {s['series_per_s'] if s['series_per_s'] is not None else '-':>8}"
        )
    e = report["end_to_end"]
    lines += [
        "",
        f"end to end: {e['series']} series in {e['seconds_median']:.2f} s = {e['series_per_s']:.3f} series/s; "
        f"slowest stage {e['slowest_stage']}; overlap efficiency {e['overlap_efficiency']:.2f}",
        f"run timings (s): {e['run_timings']}",
        f"writing: {e['write_cost_share']:.1%} of the end-to-end time (the write stage alone over end to end); "
        f"the writer thread was busy {e['write_share']:.1%} of the run's wall time, waiting for shared cores included",
    ]
    for cmp in report.get("monai", []):
        b = cmp["monai"]
        if b.get("status") != "ok":
            lines.append(f"MONAI baseline ({cmp['heads']}): {b.get('status')}")
            continue
        left = f"; left out of the baseline: {', '.join(b['left_out'])}" if b["left_out"] else ""
        lines.append(
            f"MONAI baseline ({cmp['heads']} heads): mrfm {cmp['mrfm']['series_per_s']:.3f} series/s vs MONAI "
            f"{b['series_per_s']:.3f} series/s = {cmp['speedup']:.2f}x (medians of repeats, interleaved{left})"
        )
    d = report.get("dcm2niix")
    if d is not None:
        if d.get("status") != "ok":
            lines.append(f"dcm2niix: {d.get('status')}")
        else:
            lines += [
                "",
                f"DICOM scan+load vs dcm2niix {d['flags']} (whole conversion), medians, interleaved",
                "series                   files   mrfm ms  dcm2niix ms   ratio",
            ]
            for r in d["series"]:
                lines.append(
                    f"{r['series']:<24} {r['files']:>5} {r['mrfm_ms']:>9} {r['dcm2niix_ms']:>12} {r['ratio']:>7.2f}"
                )
    rss = report["peak_rss_mib"]
    lines.append(f"\npeak RSS: this process {rss['self']:.0f} MiB, largest child {rss['children']:.0f} MiB")
    sc = report.get("rss_scale")
    if sc:
        for r in sc["runs"]:
            lines.append(
                f"  {r['studies']:>4} studies ({r['series']} series, {sc['heads']}): peak RSS {r['peak_rss_mib']:.0f} MiB "
                f"(children {r['children_peak_rss_mib']:.0f} MiB), {r['seconds']} s"
            )
        if "ratio_last_to_first" in sc:
            lines.append(
                f"  peak RSS ratio {sc['runs'][-1]['studies']} vs {sc['runs'][0]['studies']} studies: {sc['ratio_last_to_first']:.2f}x"
            )
    return "\n".join(lines)
