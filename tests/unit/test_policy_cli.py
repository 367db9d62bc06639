"""`comrecycle solve | decide | evaluate | frontier` end to end on a small randomised log."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "comrecycle.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def files(tiny_random_log, tiny_heldout_log, tiny_estimator, tiny_model_set, tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    pq.write_table(tiny_random_log, d / "log.parquet")
    pq.write_table(tiny_heldout_log, d / "held.parquet")
    return {"log": d / "log.parquet", "held": d / "held.parquet", "est": tiny_estimator,
            "profile": tiny_model_set / "cost_profile.json", "dir": d}


def test_solve_decide_evaluate_frontier(files, tiny_random_log):
    d = files["dir"]
    r = cli("solve", "--logs", files["held"], "--estimator", files["est"], "--budget", "0.01",
            "--cost-profile", files["profile"], "--out", d / "params.json")
    assert r.returncode == 0, r.stderr
    p = json.loads((d / "params.json").read_text())
    for k in ("lambda", "costs", "omega", "budget", "estimator", "estimator_cost", "certification", "loss_floor"):
        assert k in p
    assert p["budget"] == 0.01 and len(p["costs"]) == 4 and p["costs"][0] == 1.0 and p["estimator_cost"] > 0
    assert p["estimator"]["onnx_sha256_16"]
    c = p["certification"]
    assert c["certified"] and c["confidence"] == 0.5 and c["in_sample_share"] == 0.0
    assert c["label"] == "view-adjusted"  # the simulator's log has the exposure columns
    assert c["ci_pct"][0] <= c["loss_pct"] <= c["ci_pct"][1] and c["bound_pct"] <= 1.0 + 1e-9
    assert "effect loss" in r.stdout and "the estimator itself predicts" in r.stdout
    fams = c["families"]
    assert [f["strategies"] for f in fams] == [[0, 1, 2, 3], [0, 3]]
    best = max(fams, key=lambda f: (f["certified"], f["saved_pct"]))
    assert p["lambda"] == best["lambda"] and (p["strategies"] or [0, 1, 2, 3]) == best["strategies"]

    r = cli("decide", "--logs", files["log"], "--estimator", files["est"], "--params", d / "params.json",
            "--out", d / "dec.parquet")
    assert r.returncode == 0, r.stderr
    dec = pq.read_table(d / "dec.parquet")
    assert dec.column_names == ["request_id", "strategy"] and dec.num_rows == tiny_random_log.num_rows
    s = dec["strategy"].to_numpy()
    assert (s[~tiny_random_log["is_repeat"].to_numpy()] == 0).all()
    n, n_rep = tiny_random_log.num_rows, int(tiny_random_log["is_repeat"].to_numpy().sum())
    assert f"strategy mix of all {n:,} requests: " in r.stdout and f"of the {n_rep:,} repeated: " in r.stdout

    r = cli("evaluate", "--logs", files["log"], "--decisions", d / "dec.parquet", "--params", d / "params.json",
            "--estimator", files["est"], "--bootstrap", 50, "--out", d / "eval.json")
    assert r.returncode == 0, r.stderr
    ev = json.loads((d / "eval.json").read_text())
    assert set(ev["methods"]) == {"ipw", "snipw", "dr", "exact"}
    # the exact loss of the decisions equals the one computed directly from q_j
    q = np.stack([tiny_random_log[f"q_{j}"].to_numpy() for j in range(4)], 1)
    order = np.argsort(dec["request_id"].to_numpy())
    pos = order[np.searchsorted(dec["request_id"].to_numpy()[order], tiny_random_log["request_id"].to_numpy())]
    pi = s[pos].astype(int)
    truth = 100 * (1 - q[np.arange(len(pi)), pi].sum() / q[:, 0].sum())
    assert ev["methods"]["exact"]["effect_loss_pct"] == pytest.approx(truth, rel=1e-5, abs=1e-9)

    r = cli("frontier", "--logs", files["log"], "--budgets", "200", "--out", d / "bad")
    assert r.returncode == 2 and "--budgets: expected percentages in [0, 100), got [200.0]" in r.stderr
    r = cli("frontier", "--logs", files["log"], "--estimator", files["est"], "--params", d / "params.json",
            "--out", d / "frontier")
    assert r.returncode == 0, r.stderr
    for f in ("frontier.md", "frontier.csv", "frontier.png", "frontier.json"):
        assert (d / "frontier" / f).stat().st_size > 0
    fr = json.loads((d / "frontier" / "frontier.json").read_text())
    assert {"comrecycle", "oracle", "random", "static-3", "dcaf-cache_pages"} <= set(fr["curves"])
    for row in fr["table"]:  # nothing beats the oracle at equal realised loss
        for name in ("comrecycle", "random", "static-1", "static-2", "static-3", "dcaf-cache_pages"):
            if not np.isnan(row[name]):
                assert row[name] <= row["oracle"] + 1e-6, (name, row)


def test_solve_with_costs_from_logs_and_soft_form(files):
    d = files["dir"]
    r = cli("solve", "--logs", files["held"], "--estimator", files["est"], "--budget", "0.02", "--omega", "0.1",
            "--costs-from-logs", "--no-estimator-cost", "--confidence", "0.9", "--out", d / "p2.json")
    assert r.returncode == 0, r.stderr
    p = json.loads((d / "p2.json").read_text())
    assert p["omega"] == 0.1 and "mean `cost`" in p["costs_source"] and p["estimator_cost"] == 0.0
    assert p["certification"]["confidence"] == 0.9 and "ω = 0.1" in p["form"]


def test_solve_uses_the_logs_own_costs_when_no_profile_is_given(files):
    r = cli("solve", "--logs", files["held"], "--estimator", files["est"], "--budget", "0.01",
            "--out", files["dir"] / "p3.json")
    assert r.returncode == 0, r.stderr
    assert "mean `cost` per strategy in the log" in r.stdout and "estimator cost not counted" in r.stdout


def test_solve_with_a_fixed_family(files):
    r = cli("solve", "--logs", files["held"], "--estimator", files["est"], "--budget", "0.02", "--strategies", "2,3",
            "--out", files["dir"] / "fam.json")
    assert r.returncode == 0, r.stderr
    p = json.loads((files["dir"] / "fam.json").read_text())
    assert p["strategies"] == [0, 2, 3] and len(p["certification"]["families"]) == 1
    r = cli("solve", "--logs", files["held"], "--estimator", files["est"], "--strategies", "0,7",
            "--out", files["dir"] / "fam.json")
    assert r.returncode == 2 and "--strategies: expected ids in 0..3" in r.stderr


def test_availability_from_the_cache_state_not_from_missing_counterfactuals(tiny_heldout_log):
    """A log written without counterfactuals has q_j of the served strategy only; the cache
    state, not the NaN q_j, says what was available."""
    import pyarrow as pa

    from comrecycle.policy.decide import available_from_log

    full = available_from_log(tiny_heldout_log)
    t = tiny_heldout_log["strategy"].to_numpy()
    cut = tiny_heldout_log
    for j in (1, 2, 3):  # keep q_j of the served strategy only, as --no-counterfactuals writes it
        q = cut[f"q_{j}"].to_numpy().copy()
        q[t != j] = np.nan
        cut = cut.set_column(cut.column_names.index(f"q_{j}"), f"q_{j}", pa.array(q, pa.float32()))
    assert (available_from_log(cut) == full).all()
    assert full[:, 1:].sum() > (t > 0).sum()  # more is available than was served


def test_cost_sources(files):
    from comrecycle.policy.solve import CommandError, resolve_costs

    log = pq.read_table(files["held"])
    c, src, prof = resolve_costs(log, None, False, str(files["profile"]))
    assert "in the log" in src and prof is None and c[0] == 1.0
    c2, src, prof = resolve_costs(log, str(files["profile"]), False)
    assert "cost profile" in src and prof is not None
    assert np.allclose(c, c2, rtol=1e-5)  # the simulator logs the profile's c_j
    with pytest.raises(CommandError, match="pass one of them"):
        resolve_costs(log, str(files["profile"]), True)
    full = log.filter(pq.read_table(files["held"])["strategy"].to_numpy() == 0)  # no strategy 1..3 served
    c3, src, _ = resolve_costs(full, None, False, str(files["profile"]))
    assert "cost profile" in src  # falls back to the default profile
    with pytest.raises(CommandError, match=r"no strategy costs: the log has no request served by strategy \[1, 2, 3\]"):
        resolve_costs(full, None, False, "/nonexistent.json")


def test_solve_refuses_to_certify_on_the_estimators_training_rows(files):
    r = cli("solve", "--logs", files["log"], "--estimator", files["est"], "--cost-profile", files["profile"],
            "--out", files["dir"] / "in.json")
    assert r.returncode == 2 and "of the rows the estimator was trained on are in this log" in r.stderr
    r = cli("solve", "--logs", files["log"], "--estimator", files["est"], "--cost-profile", files["profile"],
            "--allow-in-sample", "--out", files["dir"] / "in.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((files["dir"] / "in.json").read_text())["certification"]["in_sample_share"] == 1.0
    r = cli("solve", "--logs", files["log"], "--estimator", files["est"], "--cost-profile", files["profile"],
            "--loss-estimate", "predicted", "--out", files["dir"] / "pred.json")
    assert r.returncode == 0 and "certification" not in json.loads((files["dir"] / "pred.json").read_text())


@pytest.mark.parametrize("args,message", [
    (["solve", "--budget", "-0.1"], "--budget: expected a relative effect loss in [0, 1) (0.01 = 1%), got -0.1"),
    (["solve", "--budget", "2"], "--budget: expected a relative effect loss in [0, 1) (0.01 = 1%), got 2"),
    (["solve", "--cost-profile", "/nonexistent.json"], "cost profile /nonexistent.json does not exist"),
    (["solve", "--estimator", "/tmp"], "missing manifest.json"),
    (["solve", "--confidence", "1.5"], "confidence: expected a level in [0.5, 1) (0.95 = a 95% upper bound), got 1.5"),
    (["decide", "--params", "/nonexistent.json"], "params file /nonexistent.json does not exist"),
])
def test_bad_inputs_are_clear_errors(files, args, message):
    cmd, rest = args[0], args[1:]
    base = {"--logs": files["held"], "--estimator": files["est"], "--out": files["dir"] / "x.out"}
    if cmd == "solve":
        base["--cost-profile"] = files["profile"]
    if cmd == "decide":
        base["--params"] = files["dir"] / "params.json"
    for k, v in zip(rest[::2], rest[1::2]):
        base[k] = v
    r = cli(cmd, *[x for kv in base.items() for x in kv])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_evaluate_rejects_decisions_with_missing_requests(files, tmp_path):
    import pyarrow as pa

    log = pq.read_table(files["log"])
    pq.write_table(pa.table({"request_id": log["request_id"].slice(0, 10),
                             "strategy": pa.array(np.zeros(10, np.int8))}), tmp_path / "d.parquet")
    r = cli("evaluate", "--logs", files["log"], "--decisions", tmp_path / "d.parquet",
            "--cost-profile", files["profile"])
    assert r.returncode == 2 and f"no decision for {log.num_rows - 10} of {log.num_rows}" in r.stderr, r.stderr


def test_depth_guard_switches_off_deep_lists():
    import numpy as np

    from comrecycle.policy.decide import depth_guard

    avail = np.ones((3, 4), bool)
    cs = np.array([[5, 1, 100] * 3, [5, 3, 100] * 3, [-1, -1, -1] * 3], np.float32)
    got = depth_guard(avail, cs, 3)
    assert got[0].all() and got[1].tolist() == [True, False, False, False]
    assert got[2].tolist() == [True, True, True, True]  # absent lists are another rule's business
    assert depth_guard(avail, cs, None) is avail


def test_closed_loop_dcaf_arguments_are_checked(files, tiny_model_set, tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"lambda": 0.0, "omega": 0.0, "choice": "argmax", "costs": [1, 0.9, 0.8, 0.05],
                                  "budget": 0.01}))
    common = ["closed-loop", "--models", tiny_model_set, "--params", params, "--requests", 50, "--quiet"]
    r = cli(*common, "--dcaf-logs", tmp_path / "missing.parquet")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = cli(*common, "--dcaf-logs", files["log"], "--oracle")
    assert r.returncode == 2 and "--dcaf-logs is its own policy" in r.stderr
    r = cli("closed-loop-frontier", "--models", tiny_model_set, "--out", tmp_path / "f", "--dcaf-logs", files["log"])
    assert r.returncode == 2 and "need --params" in r.stderr
    r = cli(*common, "--estimator", files["est"], "--explore-shadow")
    assert r.returncode == 2 and "--explore-shadow needs --explore" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "dcaf.json"
    r = cli(*common, "--dcaf-logs", files["log"], "--controller", "--seed", 3, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(out.read_text())
    assert m["policy"] == "dcaf-cache_pages + λ controller" and m["dcaf"]["mean_loss_ipw"][0] == 0.0
    assert m["requests"] == 50 and "lambda_end" in m


def test_closed_loop_feature_ceiling_arguments_are_checked(files, tiny_model_set, tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"lambda": 1.0, "omega": 0.0, "choice": "argmax", "costs": [1, 0.9, 0.8, 0.05],
                                  "budget": 0.01, "estimator_cost": 0.01}))
    common = ["closed-loop", "--models", tiny_model_set, "--params", params, "--requests", 60, "--quiet"]
    r = cli(*common, "--feature-ceiling-logs", files["log"])
    assert r.returncode == 2 and "needs --controller" in r.stderr and "Traceback" not in r.stderr
    r = cli(*common, "--feature-ceiling-logs", files["log"], "--controller", "--oracle")
    assert r.returncode == 2 and "--feature-ceiling-logs is its own policy" in r.stderr
    r = cli(*common, "--feature-ceiling-logs", tmp_path / "missing.parquet", "--controller")
    assert r.returncode == 2 and "no such file" in r.stderr
    frontier = ["closed-loop-frontier", "--models", tiny_model_set, "--params", params, "--out", tmp_path / "f",
                "--feature-ceiling-logs", files["log"]]
    r = cli(*frontier)
    assert r.returncode == 2 and "needs --ceiling-budgets" in r.stderr
    r = cli(*frontier, "--ceiling-budgets", "1,x")
    assert r.returncode == 2 and "expected budgets in % separated by commas" in r.stderr
    out = tmp_path / "ceiling.json"
    r = cli(*common, "--feature-ceiling-logs", files["log"], "--controller", "--seed", 3, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(out.read_text())
    # an upper bound: no estimator call is paid
    assert m["policy"] == "feature ceiling + λ controller" and m["requests"] == 60
    assert m["compute_saved_pct"] == m["compute_saved_without_estimator_pct"]


def test_closed_loop_warmup_serves_but_does_not_measure(files, tiny_model_set, tmp_path):
    from comrecycle.policy.closed_loop import closed_loop_metrics

    params = tmp_path / "p.json"
    params.write_text(json.dumps({"lambda": 0.0, "omega": 0.0, "choice": "argmax", "costs": [1, 0.9, 0.8, 0.05],
                                  "budget": 0.01, "estimator_cost": 0.01}))
    common = ["closed-loop", "--models", tiny_model_set, "--params", params, "--estimator", files["est"],
              "--controller", "--seed", 4, "--quiet"]
    r = cli(*common, "--requests", 40, "--warmup", -1)
    assert r.returncode == 2 and "--warmup must be >= 0" in r.stderr
    full_log, warm = tmp_path / "full.parquet", tmp_path / "warm.json"
    # the tiny world's first simulator batch is all first pages: the measured part must hold repeats
    assert cli(*common, "--requests", 600, "--log-out", full_log).returncode == 0
    r = cli(*common, "--requests", 400, "--warmup", 200, "--out", warm)
    assert r.returncode == 0, r.stderr
    m = json.loads(warm.read_text())
    assert m["requests"] == 400 and m["warmup_requests"] == 200 and m["repeated"] > 100
    # the same run (same seed, same controller path) measured from its 201st request on
    want = closed_loop_metrics(pq.read_table(full_log).slice(200), [1, 0.9, 0.8, 0.05], 0.01)
    assert m["effect_loss_pct"] == pytest.approx(want["effect_loss_pct"])
    assert m["compute_saved_pct"] == pytest.approx(want["compute_saved_pct"])


def test_a_true_q_estimator_runs_in_the_closed_loop_as_the_ceiling_without_estimator_cost(
        files, tiny_random_log, tiny_model_set, tmp_path):
    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.policy.closed_loop import closed_loop_metrics

    est = EffectLossEstimator(max_epochs=1, label="true-q", progress=False).fit(tiny_random_log).save(tmp_path / "tq")
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"lambda": 1.0, "omega": 0.0, "choice": "argmax", "costs": [1, 0.9, 0.8, 0.05],
                                  "budget": 0.01, "estimator_cost": 0.2}))
    out, log = tmp_path / "cl.json", tmp_path / "cl.parquet"
    common = ["closed-loop", "--models", tiny_model_set, "--params", params, "--estimator", est,
              "--requests", 300, "--seed", 4, "--quiet"]
    r = cli(*common)  # λ must be tuned on the true loss, as for the summary-feature ceiling
    assert r.returncode == 2 and "--label true-q" in r.stderr and "--controller" in r.stderr
    r = cli(*common, "--controller", "--out", out, "--log-out", log)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["policy"].startswith("feature ceiling (estimator inputs)")
    # the ceiling is a bound, not a served model: no estimator call is charged
    want = closed_loop_metrics(pq.read_table(log), [1, 0.9, 0.8, 0.05], 0.0)
    assert m["compute_saved_pct"] == pytest.approx(want["compute_saved_pct"])
    assert want["compute_saved_pct"] != pytest.approx(
        closed_loop_metrics(pq.read_table(log), [1, 0.9, 0.8, 0.05], 0.2)["compute_saved_pct"])
    # it is not a ComRecycle family of the closed-loop frontier, and it is never installed for serving
    r = cli("closed-loop-frontier", "--models", tiny_model_set, "--estimator", est, "--params", params,
            "--out", tmp_path / "clf")
    assert r.returncode == 2 and "feature ceiling" in r.stderr
    r = cli("install-estimator", "--estimator", est, "--repository", tmp_path / "repo")
    assert r.returncode != 0 and "not installed for serving" in r.stderr and not (tmp_path / "repo").exists()
    r = cli("train-estimator", "--logs", files["log"], "--label", "true-q", "--install", tmp_path / "repo",
            "--out", tmp_path / "tq2")
    assert r.returncode != 0 and "not installed for serving" in r.stderr and not (tmp_path / "tq2").exists()
    # the offline commands run it too, and say what it is
    r = cli("frontier", "--logs", files["held"], "--estimator", est, "--budgets", "1", "--out", tmp_path / "fr")
    assert r.returncode == 0, r.stderr
    assert "feature ceiling of the estimator's inputs" in r.stderr


def test_decide_refuses_a_params_file_that_is_not_json(files):
    r = cli("decide", "--logs", files["held"], "--estimator", files["est"], "--params", files["log"],
            "--out", files["dir"] / "d.parquet")
    assert r.returncode == 2 and "not a params JSON file (expected the output of `comrecycle solve`)" in r.stderr
    assert "Traceback" not in r.stderr


def test_closed_loop_warns_when_the_budget_is_missed():
    from comrecycle.cli.closed_loop import budget_warning

    over = {"budget_pct": 1.0, "loss_ci95": [1.5, 2.9], "effect_loss_pct": 2.18, "policy": "comrecycle, fixed λ"}
    assert "above the 1% budget" in budget_warning(over)
    assert budget_warning({**over, "loss_ci95": [0.5, 1.4]}) is None  # the interval covers the budget
    assert budget_warning({**over, "policy": "strategy 3"}) is None  # a fixed rule has no budget


def test_solve_warns_when_the_estimator_predicts_a_gain():
    from comrecycle.cli.policy import prediction_warning

    assert prediction_warning(0.8, 0.01) is None
    assert prediction_warning(-0.5, 0.01) is None  # a small gain is within noise of the budget
    w = prediction_warning(-90.024, 0.01)
    assert w.startswith("WARNING: the estimator predicts an effect loss of -90.024% (a gain)")
    assert "--loss-estimate dr" in w
    w = prediction_warning(-3.0, 0.01, dr_loss_pct=0.9)
    assert "off-policy estimate is 0.900%" in w and "calibrate-estimator" in w


def test_frontier_refuses_a_log_without_ground_truth(files, tiny_random_log, tmp_path):
    no_q = tmp_path / "no_q.parquet"
    pq.write_table(tiny_random_log.drop([f"q_{j}" for j in range(4)]), no_q)
    r = cli("frontier", "--logs", no_q, "--out", tmp_path / "fr")
    assert r.returncode == 2 and "the frontier needs ground-truth columns" in r.stderr
    nan_q = tiny_random_log
    for j in range(1, 4):  # a --logging full log: q_0 only
        i = nan_q.column_names.index(f"q_{j}")
        nan_q = nan_q.set_column(i, f"q_{j}", pa.array(np.full(nan_q.num_rows, np.nan, np.float32)))
    path = tmp_path / "nan_q.parquet"
    pq.write_table(nan_q, path)
    r = cli("frontier", "--logs", path, "--out", tmp_path / "fr")
    assert r.returncode == 2 and "the frontier needs q_1..q_3 on repeated requests; this log has none" in r.stderr


def test_policy_check_refuses_an_ensemble_of_no_nets():
    r = cli("policy-check", "--ensemble", "0", "--quiet")
    assert r.returncode == 2 and "--ensemble: expected a number of nets >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr
