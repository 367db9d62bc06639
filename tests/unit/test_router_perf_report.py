"""perf/router_perf's report: ratios pair the router and cascade runs of the same round."""
import pytest
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


def _request(start_us, latency_us, strategy):
    t = 1_000_000_000 + int(start_us * 1e3)
    outputs = [{"strategy": strategy, "strategy_scores": [-1.0, -3.4e38, -3.4e38, -0.04]}] if strategy is not None else []
    return {"timestamp": t, "response_timestamps": [t + int(latency_us * 1e3)], "response_outputs": outputs}


def test_strategy_latencies_come_from_the_export_inside_the_windows():
    from perf.router_perf import strategy_columns, strategy_latencies

    reqs = [_request(0, 5000, 0),  # starts before the first window: not measured
            _request(2000, 1000, 3), _request(3000, 1200, 3), _request(4000, 4000, 0), _request(5000, 1400, 3),
            _request(7000, 800, None),  # an error: no outputs
            _request(9500, 1000, 3)]  # ends after the last window: not measured
    export = {"experiments": [{"experiment": {"mode": "concurrency", "value": 1},
                               "window_boundaries": [1_000_000_000 + 1_000_000, 1_000_000_000 + 10_000_000],
                               "requests": reqs}]}
    lat = strategy_latencies(export)
    assert sorted(lat) == [-1, 0, 3]
    assert lat[3].tolist() == [1000.0, 1200.0, 1400.0] and lat[0].tolist() == [4000.0] and lat[-1].tolist() == [800.0]
    cols = strategy_columns(lat)
    assert cols["s3_count"] == 3 and cols["s3_p50_us"] == 1200.0 and cols["error_count"] == 1


def test_the_strategy_3_target_uses_the_strategy_3_latency():
    rows = [row("cascade", 1, 0, 200.0, 4000), {**row("router_repeat", 1, 0, 400.0, 1600), "s3_p50_us": 1100.0,
                                                "s3_p99_us": 2000.0, "s0_p50_us": 4200.0, "s0_p99_us": 6000.0}]
    res = {"rows": rows, "strategy_mix": {}}
    r = ratios(res)
    assert r[("router_repeat/s3", 1)] == [0.275] and r[("router_repeat", 1)] == [0.4]
    md = markdown(res)
    assert "| p50 of a strategy-3 request / full cascade | 1 | 0.28x | 0.28 | <= 0.3x |" in md
    assert "s0: 4.20 / 6.00, s3: 1.10 / 2.00" in md


def test_no_install_names_what_the_repository_lacks(tmp_path, capsys):
    from perf.router_perf import main, missing_router_install

    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "estimator" / "1").mkdir(parents=True)
    (tmp_path / "estimator" / "1" / "model.onnx").write_bytes(b"x")
    assert missing_router_install(tmp_path) == ["recycle_router/<version>/params.json"]
    assert main(["--repository", str(tmp_path), "--no-install"]) == 2
    assert "recycle_router/<version>/params.json" in capsys.readouterr().err
    (tmp_path / "recycle_router" / "2").mkdir(parents=True)
    (tmp_path / "recycle_router" / "2" / "params.json").write_text("{}")
    assert missing_router_install(tmp_path) == []


def test_phase_columns_are_per_batch_means_over_the_run():
    import numpy as np

    from perf.router_perf import markdown, phase_columns

    before = {"requests": np.array([10.0, 0, 0, 5]), "phase_sum": {"parse": 0.1, "decide": 1.0},
              "phase_count": {"parse": 10.0, "decide": 4.0}}
    after = {"requests": np.array([30.0, 0, 0, 25]), "phase_sum": {"parse": 0.2, "decide": 1.5, "commit": 0.3},
             "phase_count": {"parse": 30.0, "decide": 14.0, "commit": 3.0}}
    cols = phase_columns(before, after)
    assert cols["phase_parse_ms"] == pytest.approx(1e3 * 0.1 / 20)
    assert cols["phase_decide_ms"] == pytest.approx(1e3 * 0.5 / 10)
    assert cols["phase_commit_ms"] == pytest.approx(100.0)  # a phase first seen in this run
    assert cols["mean_batch"] == pytest.approx(40 / 20)
    row = {"label": "router_mix74", "concurrency": 4, "throughput_infer_per_s": 1.0, "p50_us": 1.0,
           "p99_us": 1.0, **cols}
    text = markdown({"rows": [row], "strategy_mix": {}})
    assert "| round | run | concurrency | parse | decide | commit | answered requests per batch |" in text
    assert "| 1 | router_mix74 | 4 | 5.00 | 50.00 | 100.00 | 2.00 |" in text


def test_router_counters_read_labels_in_any_order_and_ignore_other_lines():
    from perf.router_perf import parse_router_counters

    text = "\n".join([
        "# HELP comrecycle_router_requests_total requests served, by strategy",
        'comrecycle_router_requests_total{model="recycle_router",strategy="3",version="1"} 7',
        'comrecycle_router_requests_total{strategy="0",model="recycle_router",version="2"} 5 1700000000000',
        'comrecycle_router_requests_total{model="recycle_router",version="1"} 99',  # no strategy label
        'comrecycle_router_phase_seconds_sum{phase="claim",model="recycle_router",version="1"} 0.5',
        'comrecycle_router_phase_seconds_sum{model="recycle_router",subphase="claim",version="1"} 9',
        'comrecycle_router_phase_seconds_count{model="recycle_router",phase="claim",version="1"} 4',
        'comrecycle_router_phase_seconds_bucket{model="recycle_router",phase="claim",le="0.001"} 1',
        "nv_inference_request_success{model=\"cascade\",version=\"1\"} 12",
    ])
    got = parse_router_counters(text)
    assert got["requests"].tolist() == [5.0, 0.0, 0.0, 7.0]
    assert got["phase_sum"] == {"claim": 0.5} and got["phase_count"] == {"claim": 4.0}
