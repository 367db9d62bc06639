"""The simulator is calibrated to the published traffic (docs/method.md#simulator) and deterministic."""
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


def _step_interest(world, seed, steps=30):
    """(interest before, interest after, batch, outcome, slots still in the same session) per step."""
    sim = SessionSimulator(world, seed=seed, concurrency=64)
    pol = LoggingPolicy(world, seed)
    for _ in range(steps):
        b = sim.next_batch()
        before = sim.interest[b.slots].copy()
        out = sim.feedback(b, pol(b))
        yield sim, b, before, out


def test_clicks_move_interest_towards_related_content(world):
    """Real-time intent: after clicks, the interest moves towards the *related* category of
    what was clicked (phone -> phone case), more than towards the clicked items themselves."""
    to_related, to_clicked, idle = [], [], []
    for sim, b, before, out in _step_interest(world, 5):
        for i, s in enumerate(b.slots):
            if sim.page[s] == 0 or sim.secs_since_prev[s] > 30:
                continue  # session ended (new user in the slot), or a gap that brings activity elsewhere
            clicked = world.item_index(out.clicked_items[i])
            if clicked.size:
                rel = world.category_center[world.related_category[world.item_category[clicked]]].mean(0)
                to_related.append(sim.interest[s] @ rel - before[i] @ rel)
                v = world.item_vec[clicked].mean(0)
                to_clicked.append(sim.interest[s] @ v - before[i] @ v)
            else:
                idle.append(np.linalg.norm(sim.interest[s] - before[i]))
    assert len(to_related) > 50
    assert np.mean(to_related) > 0.15  # interest moved toward the related category
    assert np.mean(to_related) > 2 * np.mean(to_clicked)
    assert 0.0 < np.mean(idle) < 0.1  # and it wanders a little with time even without clicks


def test_related_category_is_a_near_neighbour(world):
    c = world.category_center
    sim = c @ c.T
    np.fill_diagonal(sim, -np.inf)
    rank = (sim > sim[np.arange(len(c)), world.related_category][:, None]).sum(1)
    assert (world.related_category != np.arange(len(c))).all()
    assert (rank < 3).all()  # one of the three nearest other categories


def test_volatility_partly_explained_by_demographics(world):
    from sklearn.linear_model import LinearRegression

    f = world.user_features
    x = np.concatenate([np.eye(2)[f[:, 0]], np.eye(6)[f[:, 1]], np.eye(20)[f[:, 2]]], 1)
    y = np.log(world.user_volatility)
    r2 = LinearRegression().fit(x, y).score(x, y)
    assert 0.3 < r2 < 0.8, r2  # demographics tell some, a latent trait the rest
    assert abs(world.user_volatility.mean() - 1) < 1e-3


def test_long_gaps_bring_clicks_from_elsewhere_into_the_history(world):
    """Activity elsewhere during a gap: the history grows without clicks on the page."""
    grew = {"short": [], "long": []}
    sim = SessionSimulator(world, seed=8, concurrency=64)
    pol = LoggingPolicy(world, 8)
    for _ in range(40):
        b = sim.next_batch()
        lens_before = (sim.history[b.user_index] >= 0).sum(1)
        out = sim.feedback(b, pol(b))
        for i, s in enumerate(b.slots):
            if sim.page[s] == 0 or lens_before[i] >= 40:
                continue
            extra = (sim.history[b.user_index[i]] >= 0).sum() - lens_before[i] - out.clicked_items[i].size
            grew["long" if sim.secs_since_prev[s] > 300 else "short"].append(extra)
    assert np.mean(grew["long"]) > 0.5 > np.mean(grew["short"])


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


class _Repeats:
    """What a logging assignment reads of a batch: B repeated requests of distinct sessions."""

    def __init__(self, n: int):
        self.session_id = np.arange(n, dtype=np.int64)
        self.is_repeat = np.ones(n, bool)

    def __len__(self) -> int:
        return self.session_id.size


def test_skewed_logging_draws_and_logs_probabilities_among_the_available_strategies():
    from comrecycle.sim.recycling import uniform_random_assignment

    n = 40_000
    available = np.ones((n, 4), bool)
    available[n // 2:, 2:] = False  # the second half: only strategies 0 and 1 have a cache
    strategy, propensity = uniform_random_assignment(7, [0.45, 0.05, 0.05, 0.45])(_Repeats(n), available)
    full, part = slice(0, n // 2), slice(n // 2, n)
    assert np.allclose(np.bincount(strategy[full], minlength=4) / (n // 2), [0.45, 0.05, 0.05, 0.45], atol=0.01)
    assert set(np.unique(strategy[part])) == {0, 1}
    assert abs((strategy[part] == 0).mean() - 0.9) < 0.01
    expected = np.where(strategy[full] % 3 == 0, 0.45, 0.05)
    assert np.allclose(propensity[full], expected)
    assert np.allclose(propensity[part], np.where(strategy[part] == 0, 0.9, 0.1))
    # each strategy's inverse-propensity weights average to one: IPW stays unbiased
    for j in range(4):
        assert abs(np.mean((strategy[full] == j) / propensity[full]) - 1) < 0.06
