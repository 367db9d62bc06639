"""Named sizes of the simulated world and the model set (default: the published scale)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .specs import CascadeSizes
from .errors import UserError


@dataclass(frozen=True)
class Profile:
    name: str
    n_items: int
    n_users: int
    sizes: CascadeSizes
    train_requests: int  # requests in the bootstrap log the stage models learn from
    epochs: int  # prerank, rank, rerank
    retrieval_epochs: int
    rank_examples: int = 400_000  # cap on (request, item) examples for ranking (2x for pre-ranking)
    emb_dim: int = 32
    rank_hidden: tuple[int, ...] = (256, 128, 64)  # ranking is the heavy stage
    rank_attention_hidden: int = 32
    rank_attention_window: int = 20  # most recent clicks the ranker attends over


PROFILES = {
    "default": Profile("default", n_items=20_000, n_users=5_000, sizes=CascadeSizes(1000, 300, 100, 20),
                       train_requests=200_000, epochs=3, retrieval_epochs=10, rank_examples=800_000),
    "tiny": Profile("tiny", n_items=2_000, n_users=500, sizes=CascadeSizes(200, 100, 50, 20),
                    train_requests=12_000, epochs=2, retrieval_epochs=20, rank_examples=60_000, emb_dim=16, rank_hidden=(64, 32),
                    rank_attention_hidden=16),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UserError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}") from None
