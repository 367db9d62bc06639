"""Shared by the router core's unit tests: request tensors and a router over a memory cache
(the `backend` fixture is in conftest.py)."""
from __future__ import annotations

import asyncio

import numpy as np

from comrecycle.router.core import RecycleRouter
from comrecycle.router.memory_cache import MemoryStageCache as MemoryCache
from comrecycle.router.params import RouterParams

VERSION = "test-models"


def request(user, history=(), viewed=(), clicked=(), t=None, features=(0, 1, 2), new_session=None, token=None):
    r = {"user_id": np.array([[user]], np.int64), "user_features": np.array([features], np.int64),
         "history": np.array([list(history)], np.int64).reshape(1, -1),
         "viewed_items": np.array([list(viewed)], np.int64).reshape(1, -1),
         "clicked_items": np.array([list(clicked)], np.int64).reshape(1, -1)}
    if t is not None:
        r["request_time"] = np.array([[t]], np.float64)
    if new_session is not None:
        r["new_session"] = np.array([[new_session]], np.int64)
    if token is not None:
        r["page_token"] = np.array([[token]], np.int64)
    return r


def make_router(backend, costs=(1.0, 0.9, 0.8, 0.05), lam=1e-3, cache=None, ttl_s=900.0):
    """λ = 1e-3: ΔQ̂ (|ΔQ̂| < 1) never outweighs the cost gaps, but the estimator is called."""
    params = RouterParams(lam=lam, costs=tuple(costs), estimator_cost=0.02)
    return RecycleRouter(cache or MemoryCache(), backend, params, VERSION, ttl_s=ttl_s, clock=lambda: 1000.0)


def serve(router, reqs):
    return asyncio.run(router.serve(reqs))
