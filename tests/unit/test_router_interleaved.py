"""perf/router_interleaved: the phase sums read from a Prometheus page."""
from unittest import mock

from perf.router_interleaved import phase_sums

PAGE = """# HELP comrecycle_router_phase_seconds ...
comrecycle_router_phase_seconds_sum{model="recycle_router",version="1",phase="claim"} 0.25
comrecycle_router_phase_seconds_count{model="recycle_router",version="1",phase="claim"} 100
comrecycle_router_phase_seconds_sum{model="recycle_router",version="2",phase="claim"} 0.05
comrecycle_router_phase_seconds_count{model="recycle_router",version="2",phase="claim"} 20
comrecycle_router_phase_seconds_bucket{model="recycle_router",version="2",phase="claim",le="0.001"} 3
"""


def test_phase_sums_add_versions_and_ignore_buckets():
    with mock.patch("urllib.request.urlopen") as op:
        op.return_value.read.return_value = PAGE.encode()
        s = phase_sums("http://x/metrics")
    assert s["claim"].tolist() == [0.3, 120.0] and s["stages"].tolist() == [0.0, 0.0]
