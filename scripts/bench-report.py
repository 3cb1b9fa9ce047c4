#!/usr/bin/env python3
"""Renders a daprd-bench JSON result file as the Markdown tables of docs/BENCHMARKS.md.

    python3 scripts/bench-report.py target/bench-full.json
"""
import json
import sys


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def main(path):
    d = json.load(open(path))
    print(f"Blocks: {d['blocks']} × {d['block_secs']} s per row and concurrency; brokers: "
          f"{', '.join(d['brokers'])}.\n")
    for c in (1, 16):
        rows = [r for r in d["publish"] if r.get("concurrency") == c and "row" in r]
        print(f"#### Publish, concurrency {c}\n")
        print("| row | p50 µs | p99 µs | p99.9 µs | msg/s | B−A p50 µs | B−A p99 µs | B/A p50 | B/A p99 | sidecar CPU µs/msg |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            def ratio(q):
                added = r[f"added_{q}_us"]
                base = None if added is None else r[f"{q}_us"] - added
                return None if not base else r[f"{q}_us"] / base
            print(f"| {' '.join(r['row'].split())} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['p999_us'])} | "
                  f"{fmt(r['msgs_per_s'])} | {fmt(r['added_p50_us'])} | {fmt(r['added_p99_us'])} | "
                  f"{fmt(ratio('p50'), 2)} | {fmt(ratio('p99'), 2)} | {fmt(r['sidecar_cpu_us_per_msg'], 1)} |")
        print()
    e = d.get("end_to_end") or {}
    if e:
        print("#### End to end (publish → daprd-rs → app 2xx → ack)\n")
        print("| component | mode | p50 µs | p99 µs | p99.9 µs | max µs | delivered | lost | msg/s | RSS KiB |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in e["rows"]:
            if "open_loop_rate" in r:
                print(f"| {r['e2e']} | open loop {r['open_loop_rate']}/s | {r['p50_us']} | {r['p99_us']} | "
                      f"{r['p999_us']} | {r['max_us']} | {r['delivered']} | {r['lost']} | - | {r['rss_kib']} |")
            elif "closed_loop_publishers" in r:
                print(f"| {r['e2e']} | closed loop, 16 publishers | {r['p50_us']} | {r['p99_us']} | - | - | "
                      f"{r['delivered']} | {r['lost']} | {fmt(r['delivered_per_s'])} | - |")
            else:
                print(f"| redis, 10 ms handler, concurrency 10 | {r['delivered']} messages | - | - | - | - | "
                      f"{r['delivered']} | {r['published'] - r['delivered']} | {fmt(r['delivered_per_s'])} "
                      f"(ceiling {fmt(r['ceiling_per_s'])}: handler mean {fmt(r['handler_mean_ms'], 2)} ms) | - |")
        idle = e["idle"]
        print(f"\nIdle sidecar with subscriptions: CPU {fmt(idle['cpu_pct'], 3)} % over {idle['seconds']} s; "
              f"RSS {idle['rss_first_kib']} KiB after {idle['rss_first_after_s']} s, {idle['rss_end_kib']} KiB "
              f"after {idle['seconds']} s; RSS at 1k msg/s (Redis, end of the run): {e['rss_at_1k_per_s_kib']} KiB.\n")
    s = d["startup_ms"]
    print(f"Startup (exec → /v1.0/healthz/outbound 204): p50 {fmt(s['p50'], 1)} ms, max {fmt(s['max'], 1)} ms "
          f"({s['runs']} runs). Publish sidecar ({len(d['brokers'])} components): idle RSS {d['idle_rss_kib']} KiB, "
          f"{d['rss_after_load_kib']} KiB after the publish rows. Binary {d['binary_bytes'] / 1e6:.1f} MB, "
          f"stripped {fmt((d.get('stripped_binary_bytes') or 0) / 1e6, 1)} MB.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/bench-results.json")
