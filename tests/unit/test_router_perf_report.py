"""perf/router_perf's report: ratios pair the router and cascade runs of the same round."""
from perf.router_perf import markdown, ratios


def row(label, c, rnd, thr, p50):
    return {"label": label, "concurrency": c, "round": rnd, "throughput_infer_per_s": thr, "p50_us": p50,
            "p99_us": 2 * p50}


def test_ratios_pair_runs_of_the_same_round_and_level():
    rows = [row("cascade", 16, 0, 100.0, 80_000), row("router_mix74", 16, 0, 150.0, 50_000),
            row("cascade", 16, 1, 80.0, 100_000), row("router_mix74", 16, 1, 136.0, 60_000),
            row("router_repeat", 16, 1, 300.0, 30_000), row("cascade", 1, 0, 60.0, 16_000),
            row("router_initial", 1, 0, 50.0, 19_200), row("router_initial", 16, 1, 68.0, 200_000)]
    res = {"rows": rows, "strategy_mix": {"router_mix74@16#0": [0.4, 0, 0, 0.6]}}
    r = ratios(res)
    assert r[("router_mix74", 16)] == [1.5, 1.7]  # 150/100 and 136/80: never 150/80
    assert r[("router_repeat", 16)] == [0.3] and r[("router_initial", 1)] == [1.2]
    assert r[("router_mix74/router_initial", 16)] == [2.0]  # 136/68, round 1 only: round 0 has no such run
    md = markdown(res)
    assert "| throughput, 74% repeated mix / always-full | 16 | 1.60x | 1.50, 1.70 | >= 1.5x |" in md
    assert "40%/0%/0%/60%" in md
    assert "| throughput, 74% repeated mix / always-full through the router | 16 | 2.00x | 2.00 |" in md


def test_load_points_are_timed_windows_without_a_stability_gate():
    from perf.router_perf import WINDOWS, measurement_args

    a = measurement_args(15000)
    assert a["measurement_mode"] == "time_windows" and a["measurement_interval_ms"] == 5000
    assert a["max_trials"] == WINDOWS and a["stability_percentage"] >= 100 and "request_count" not in a
    assert measurement_args(100)["measurement_interval_ms"] == 1000  # perf_analyzer's windows stay >= 1 s
