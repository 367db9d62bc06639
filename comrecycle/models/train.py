"""Train the four stages on a simulated request log (the bootstrap log of build_models.py).

Examples come only from what a real system logs: the context of each request, the served
page, how far the user scrolled (n_viewed) and what was clicked.
  retrieval  softmax over the catalogue of each clicked item given the request context
  prerank    BCE: clicked vs viewed-not-clicked vs random catalogue negatives
  rank       same examples as prerank (it learns the real-time signals prerank lacks)
  rerank     BCE over the viewed positions of each logged page, with the page as list context
Seeded and deterministic on CPU; validation metrics are kept for the manifest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm import tqdm

from ..profiles import Profile
from ..specs import HISTORY_MAX as HISTORY_LEN
from ..specs import PAGE_SIZE
from .nets import PreRank, Rank, ReRank, Retrieval
from .vocab import Vocab


@dataclass
class LogArrays:
    """Request log as dense arrays (vocabulary indices)."""

    user_idx: np.ndarray  # [R,1]
    user_features: np.ndarray  # [R,3]
    history_idx: np.ndarray  # [R,H]
    request_features: np.ndarray  # [R,4]
    page_idx: np.ndarray  # [R,20] (0 = no item)
    viewed: np.ndarray  # [R,20] bool
    clicked: np.ndarray  # [R,20] bool

    def __len__(self):
        return self.user_idx.shape[0]


def _list_matrix(col: pa.ChunkedArray, width: int) -> np.ndarray:
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    lens = np.minimum(np.diff(offsets), width)
    out = np.full((len(arr), width), -1, dtype=np.int64)
    pos = np.arange(width)[None, :]
    mask = pos < lens[:, None]
    src = offsets[:-1, None] + pos
    out[mask] = values[src[mask]]
    return out


def log_arrays(table: pa.Table, user_vocab: Vocab, item_vocab: Vocab) -> LogArrays:
    col = lambda n: table[n].to_numpy()  # noqa: E731
    page = _list_matrix(table["page_items"], PAGE_SIZE)
    clicked_ids = _list_matrix(table["clicked_items"], PAGE_SIZE)
    n_viewed = col("n_viewed").astype(np.int64)
    viewed = np.arange(PAGE_SIZE)[None, :] < n_viewed[:, None]
    clicked = np.zeros_like(viewed)
    for j in range(PAGE_SIZE):
        clicked |= (page == clicked_ids[:, j:j + 1]) & (clicked_ids[:, j:j + 1] >= 0)
    rf = np.stack([col("secs_since_prev"), col("page").astype(np.float32),
                   col("prev_exposures").astype(np.float32), col("prev_clicks").astype(np.float32)], 1)
    return LogArrays(
        user_idx=user_vocab.index(col("user_id")).reshape(-1, 1),
        user_features=np.stack([col("gender"), col("age"), col("country")], 1).astype(np.int64),
        history_idx=item_vocab.index(_list_matrix(table["history"], HISTORY_LEN)),
        request_features=rf.astype(np.float32),
        page_idx=item_vocab.index(page), viewed=viewed & (page >= 0), clicked=clicked & viewed)


def _ctx(a: LogArrays, rows: np.ndarray, drop_user: float, rng: np.random.Generator):
    u = a.user_idx[rows].copy()
    if drop_user > 0:  # learn the cold-start (OOV) user embedding too
        u[rng.random(len(rows)) < drop_user] = 1
    return (torch.from_numpy(u), torch.from_numpy(a.user_features[rows]),
            torch.from_numpy(a.history_idx[rows]), torch.from_numpy(a.request_features[rows]))


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, bar) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    pos = y > 0
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


class StageTrainer:
    def __init__(self, profile: Profile, user_vocab: Vocab, item_vocab: Vocab, item_category: np.ndarray,
                 seed: int = 0, progress: bool = True):
        """item_category: [len(item_vocab)] category code of each vocabulary item (sorted id order)."""
        self.p = profile
        self.item_category = torch.from_numpy(np.asarray(item_category, np.int64))
        self.uv, self.iv = user_vocab, item_vocab
        self.seed = seed
        self.progress = progress
        self.metrics: dict[str, dict] = {}

    def _bar(self, n, desc):
        return tqdm(total=n, desc=desc, unit="step", disable=not self.progress, mininterval=1.0)

    def build(self, name: str) -> nn.Module:
        p, nu, cat = self.p, len(self.uv), self.item_category
        torch.manual_seed(self.seed * 100 + ("retrieval", "prerank", "rank", "rerank").index(name))
        if name == "retrieval":
            return Retrieval(nu, torch.from_numpy(self.iv.ids), cat, p.emb_dim, p.sizes.retrieval)
        if name == "prerank":
            return PreRank(nu, cat, p.emb_dim, p.sizes.prerank)
        if name == "rank":
            return Rank(nu, cat, p.emb_dim, p.sizes.rank, p.rank_hidden, p.rank_attention_hidden,
                        p.rank_attention_window)
        return ReRank(nu, cat, p.emb_dim, p.sizes.rerank)

    def fit_all(self, train: LogArrays, valid: LogArrays) -> dict[str, nn.Module]:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        return {"retrieval": self.fit_retrieval(train, valid), "prerank": self.fit_pointwise("prerank", train, valid),
                "rank": self.fit_pointwise("rank", train, valid), "rerank": self.fit_rerank(train, valid)}

    # ---- retrieval -------------------------------------------------------------------------
    def fit_retrieval(self, train: LogArrays, valid: LogArrays, batch: int = 256, n_neg: int = 2048
                      ) -> nn.Module:
        t0 = time.time()
        model = self.build("retrieval")
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(self.seed)
        rows, pos = np.nonzero(train.clicked)
        items = train.page_idx[rows, pos]
        steps = self.p.retrieval_epochs * max(1, len(rows) // batch)
        with self._bar(steps, "train retrieval") as bar:
            for _ in range(self.p.retrieval_epochs):
                perm = rng.permutation(len(rows))
                for b in range(0, len(perm) - batch + 1, batch):
                    sel = perm[b:b + batch]
                    u = model.user(*_ctx(train, rows[sel], 0.1, rng)[:3])
                    # sampled softmax: the batch's clicked items + uniform catalogue negatives
                    neg = rng.integers(2, len(self.iv) + 2, n_neg)
                    cand = torch.from_numpy(np.concatenate([items[sel], neg]))
                    logits = u @ model.item_emb(cand).T + model.item_bias(cand).T
                    loss = nn.functional.cross_entropy(logits, torch.arange(len(sel)))
                    _step(opt, loss, bar)
        model.eval()
        vr, vp = np.nonzero(valid.clicked)
        vr, vp = vr[:4000], vp[:4000]
        with torch.no_grad():
            s = model.all_scores(model.user(*_ctx(valid, vr, 0.0, rng)[:3]))
            s[:, :2] = float("-inf")
            target = torch.from_numpy(valid.page_idx[vr, vp])
            rank = (s > s.gather(1, target[:, None])).sum(1).numpy()
        k = self.p.sizes.retrieval
        self.metrics["retrieval"] = {"valid_recall_at_k": float((rank < k).mean()), "k": k,
                                     "valid_clicks": int(len(vr)), "train_clicks": int(len(rows)),
                                     "seconds": round(time.time() - t0, 1)}
        return model

    # ---- pointwise (prerank, rank) ---------------------------------------------------------
    def _pointwise_examples(self, a: LogArrays, rng: np.random.Generator, n_neg: int = 3,
                            limit: int | None = None):
        rows, pos = np.nonzero(a.viewed)
        items = a.page_idx[rows, pos]
        labels = a.clicked[rows, pos].astype(np.float32)
        neg_rows = np.repeat(np.arange(len(a)), n_neg)
        neg_items = rng.integers(2, len(self.iv) + 2, neg_rows.size)
        rows = np.concatenate([rows, neg_rows])
        items = np.concatenate([items, neg_items])
        labels = np.concatenate([labels, np.zeros(neg_rows.size, np.float32)])
        keep = items >= 2
        rows, items, labels = rows[keep], items[keep], labels[keep]
        if limit is not None and len(rows) > limit:
            sel = rng.choice(len(rows), limit, replace=False)
            rows, items, labels = rows[sel], items[sel], labels[sel]
        return rows, items, labels

    def _score_pointwise(self, model, a, rows, items, rng, drop_user=0.0):
        ctx = _ctx(a, rows, drop_user, rng)
        cand = torch.from_numpy(items[:, None])
        return model.score(*ctx, cand).squeeze(1)

    def fit_pointwise(self, name: str, train: LogArrays, valid: LogArrays, batch: int = 512) -> nn.Module:
        t0 = time.time()
        model = self.build(name)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        rng = np.random.default_rng(self.seed + 1)
        limit = self.p.rank_examples if name == "rank" else 2 * self.p.rank_examples
        rows, items, labels = self._pointwise_examples(train, rng, limit=limit)
        steps = self.p.epochs * max(1, len(rows) // batch)
        with self._bar(steps, f"train {name}") as bar:
            for _ in range(self.p.epochs):
                perm = rng.permutation(len(rows))
                for b in range(0, len(perm) - batch + 1, batch):
                    sel = perm[b:b + batch]
                    s = self._score_pointwise(model, train, rows[sel], items[sel], rng, 0.1)
                    loss = nn.functional.binary_cross_entropy_with_logits(s, torch.from_numpy(labels[sel]))
                    _step(opt, loss, bar)
        model.eval()
        vrows, vitems, vlabels = self._pointwise_examples(valid, rng, limit=40_000)
        with torch.no_grad():
            vs = torch.cat([self._score_pointwise(model, valid, vrows[b:b + 2048], vitems[b:b + 2048], rng)
                            for b in range(0, len(vrows), 2048)]).numpy()
        self.metrics[name] = {"valid_auc_click_vs_all": _auc(vlabels, vs), "examples": int(len(rows)),
                              "seconds": round(time.time() - t0, 1)}
        return model

    # ---- rerank ----------------------------------------------------------------------------
    def fit_rerank(self, train: LogArrays, valid: LogArrays, batch: int = 256) -> nn.Module:
        t0 = time.time()
        model = self.build("rerank")
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        rng = np.random.default_rng(self.seed + 2)
        rows = np.nonzero(train.viewed.any(axis=1))[0]
        steps = self.p.epochs * max(1, len(rows) // batch)

        def loss_and_scores(a, sel, drop):
            cand = torch.from_numpy(a.page_idx[sel])
            s = model.score(*_ctx(a, sel, drop, rng), cand)
            m = torch.from_numpy(a.viewed[sel])
            y = torch.from_numpy(a.clicked[sel].astype(np.float32))
            loss = nn.functional.binary_cross_entropy_with_logits(s[m], y[m])
            return loss, s[m].detach().numpy(), y[m].numpy()

        with self._bar(steps, "train rerank") as bar:
            for _ in range(self.p.epochs):
                perm = rng.permutation(rows)
                for b in range(0, len(perm) - batch + 1, batch):
                    loss, _, _ = loss_and_scores(train, perm[b:b + batch], 0.1)
                    _step(opt, loss, bar)
        model.eval()
        vrows = np.nonzero(valid.viewed.any(axis=1))[0][:8000]
        with torch.no_grad():
            _, s, y = loss_and_scores(valid, vrows, 0.0)
        self.metrics["rerank"] = {"valid_auc_viewed": _auc(y, s), "pages": int(len(rows)),
                                  "seconds": round(time.time() - t0, 1)}
        return model
