"""The simulator is calibrated to the published traffic (DESIGN.md §5) and deterministic."""
import numpy as np
import pytest

from comrecycle.sim import LoggingPolicy, SessionSimulator, World
from comrecycle.sim.logs import CONTRACT_COLUMNS, LOG_SCHEMA, read_log, write_log


@pytest.fixture(scope="module")
def world():
    return World.generate(n_items=20_000, n_users=5_000, seed=3)


@pytest.fixture(scope="module")
def log_table(world):
    sim = SessionSimulator(world, seed=3, concurrency=256)
    return sim.run(30_000, LoggingPolicy(world, 3), progress=False).table()


def test_repeated_share_is_74_percent(log_table):
    assert abs(log_table["is_repeat"].to_numpy().mean() - 0.74) <= 0.03


def test_gaps_between_requests(log_table):
    gaps = log_table["secs_since_prev"].to_numpy()
    rep = log_table["is_repeat"].to_numpy()
    assert (gaps[~rep] == -1).all()
    g = gaps[rep]
    assert abs((g < 10).mean() - 0.46) <= 0.03
    assert abs((g < 120).mean() - 0.75) <= 0.03


def test_most_pages_less_than_half_viewed(log_table):
    n_viewed = log_table["n_viewed"].to_numpy()
    full_pages = np.array([len(p) for p in log_table["page_items"].to_pylist()]) == 20
    assert abs((n_viewed[full_pages] < 10).mean() - 0.70) <= 0.03


def test_initial_requests_are_first_pages(log_table):
    page = log_table["page"].to_numpy()
    rep = log_table["is_repeat"].to_numpy()
    assert ((page == 0) == ~rep).all()


def test_interest_drifts_towards_clicked_items(world):
    """Real-time intent: after clicks, items like the clicked ones become more attractive."""
    sim = SessionSimulator(world, seed=5, concurrency=64)
    pol = LoggingPolicy(world, 5)
    gains, idle = [], []
    for _ in range(30):
        b = sim.next_batch()
        before = sim.interest[b.slots].copy()
        out = sim.feedback(b, pol(b))
        for i, s in enumerate(b.slots):
            if sim.page[s] == 0:
                continue  # session ended: new user in the slot
            clicked = world.item_index(out.clicked_items[i])
            if clicked.size:
                v = world.item_vec[clicked].mean(0)
                gains.append(sim.interest[s] @ v - before[i] @ v)
            else:
                idle.append(np.linalg.norm(sim.interest[s] - before[i]))
    assert len(gains) > 50
    assert np.mean(gains) > 0.1  # interest moved toward what was clicked
    assert np.mean(idle) > 0.0  # and it wanders with time even without clicks


def test_deterministic_for_a_seed(world):
    a = SessionSimulator(world, seed=9, concurrency=32).run(500, LoggingPolicy(world, 9), progress=False).table()
    b = SessionSimulator(world, seed=9, concurrency=32).run(500, LoggingPolicy(world, 9), progress=False).table()
    c = SessionSimulator(world, seed=10, concurrency=32).run(500, LoggingPolicy(world, 10), progress=False).table()
    assert a.equals(b)
    assert not a.equals(c)


def test_log_schema_roundtrip(log_table, tmp_path):
    p = write_log(log_table.slice(0, 1000), tmp_path / "log.parquet")
    t = read_log(p, require_sim_columns=True)
    for f in LOG_SCHEMA:
        assert t.schema.field(f.name).type == f.type
    assert tuple(t.column_names[:len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert (t["strategy"].to_numpy() == 0).all()
    assert max(len(h) for h in t["history"].to_pylist()) <= 50


def test_read_log_names_missing_columns(log_table, tmp_path):
    p = write_log(log_table.drop(["history"]).slice(0, 10), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing columns.*history"):
        read_log(p)


def test_ids_are_arbitrary_int64(world):
    assert world.item_ids.min() >= 10_000_000 and (np.diff(world.item_ids) > 0).all()
    assert (world.item_index(world.item_ids[[5, 7]]) == [5, 7]).all()
    assert (world.item_index(np.array([-1, 3])) == -1).all()


def test_expected_clicks_rewards_good_pages(world):
    rng = np.random.default_rng(0)
    s = world.user_interest[:50]
    best = np.argsort(-world.logits(s), axis=1)[:, :20]
    rand = rng.integers(0, world.n_items, (50, 20))
    assert world.expected_clicks(s, best).mean() > 5 * world.expected_clicks(s, rand).mean()
