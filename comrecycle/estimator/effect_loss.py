"""`EffectLossEstimator`: sklearn-like fit / predict around EffectLossNet.

Trained on randomised logs, on the observed reward of the assigned arm only (the other arms
are unobserved in real logs; q_j columns are not used for training): Poisson likelihood of
the clicks under Q_t, weighted by 1/propensity. The one exception is the diagnostic label
"true-q" (labels.py): squared error on a simulator log's exact q_0 and ΔQ_j of every arm, the
feature ceiling of the estimator's own inputs. Item ids go through a vocabulary built from
the training logs' histories (unseen ids -> OOV bucket); categorical codes are hashed, so any
int64 works in training and in serving. Seeded; early stopping on a validation split of
sessions; progress bar.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import torch
from tqdm import tqdm

from ..models.export import IDX, OPSET, graft
from ..models.vocab import Vocab
from ..sim.logs import training_row_sample
from ..specs import CACHE_STATE, ESTIMATOR_INPUTS, ESTIMATOR_OUTPUTS, N_RECYCLE
from .calibration import DepthCalibration, fit_depth_calibration, graft_calibration
from .labels import TRUE_Q, training_labels
from .log_features import LogError, features_from_log, has_cache_state, validate_training_log
from .network import EffectLossNet, EnsembleNet
from ..errors import UserError

ORT_CHUNK = 65_536  # rows per onnxruntime call in predict (bounds the memory of the GRU's activations)
# label "true-q": weight of the squared error of ΔQ_j against that of the levels q_j in the loss.
# ΔQ is a small difference of two levels; without the weight the level fit dominates. On the
# 200k seed-202 log weights 1, 4 and 16 ranked alike (42.2-42.7% saved at 1% one-step).
TRUE_Q_UPLIFT_WEIGHT = 4.0


def _repeated_with_labels(table: pa.Table, label: str) -> tuple[pa.Table, np.ndarray, dict]:
    """The repeated requests of a log and their labels [rows]. The labels are computed over the
    whole log first: the view adjustment's item click rates use every page."""
    y, info = training_labels(table, label)
    is_rep = table["is_repeat"].to_numpy(zero_copy_only=False).astype(bool)
    return table.filter(pa.array(is_rep)), y[is_rep], info


def _true_q_errors(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row squared errors [B] of the levels Σ_j (Q̂_j − q_j)² and of the uplifts
    Σ_j (ΔQ̂_j − ΔQ_j)², over the arms whose q_j is known (an uplift also needs q_0).
    logits [B, K+1], y [B, K+1] (NaN = unknown)."""
    q = torch.exp(logits)
    known = torch.isfinite(y)
    yk = torch.nan_to_num(y)
    level = ((q - yk) ** 2 * known).sum(1)
    uplift = (((q[:, :1] - q[:, 1:]) - (yk[:, :1] - yk[:, 1:])) ** 2 * (known[:, :1] & known[:, 1:])).sum(1)
    return level, uplift


@dataclass
class EffectLossEstimator:
    emb: int = 16
    hidden: int = 32
    n_experts: int = 4
    lr: float = 3e-3
    batch_size: int = 512
    max_epochs: int = 15  # 200k repeated requests: ~35 s per epoch on 2 cores -> <= 9 min
    patience: int = 3
    # Early stopping watches the Poisson validation loss, which the level of Q dominates: it
    # stops after 2-5 epochs, before the uplift towers learn the depth effect (docs/history.md, "More deep data, longer training, a scale").
    # Epochs before min_epochs neither stop training nor count as the best one.
    min_epochs: int = 0
    # > 0: the model is the average of the weights at the end of the last `average_epochs`
    # epochs (stochastic weight averaging) instead of the best epoch; with noisy labels the
    # single last epoch has memorised rows (docs/history.md, "View-adjusted labels, weight averaging and epochs")
    average_epochs: int = 0
    valid_fraction: float = 0.1
    ipw: bool = True
    seed: int = 0
    # the session page each cached list was computed for, as a feature (model.py); estimators
    # saved before it existed load without it
    list_origin: bool = True
    # what the towers regress on: "clicks" (the logged reward) or "view-adjusted" clicks, which
    # remove the noise of how far users scrolled without bias (labels.py); "true-q" is the
    # diagnostic that regresses a simulator log's exact q_j (the feature ceiling of these inputs)
    label: str = "clicks"
    # what early stopping and the choice of epoch watch on the validation sessions: "outcome"
    # (the Poisson / squared loss of the logged arm's reward, dominated by the level of Q) or
    # "uplift" (minus the summed Qini coefficient of ΔQ̂_j, IPW-weighted: how well the model
    # ranks requests by their loss of recycling, which is what the policy uses)
    select: str = "outcome"
    # > 1: that many nets trained with different seeds on the same log, served as one graph
    # whose q is their mean (network.EnsembleNet); costs that many times the estimator's compute
    ensemble: int = 1
    progress: bool = True
    history_: dict = field(default_factory=dict, init=False)

    # ---- training --------------------------------------------------------------------------
    def fit(self, table: pa.Table) -> "EffectLossEstimator":
        self.onnx_path_ = None  # a saved graph (if any) is of the previous weights
        validate_training_log(table)
        if self.select not in ("outcome", "uplift"):
            raise UserError(f"select: expected 'outcome' or 'uplift', got {self.select!r}")
        if not (isinstance(self.ensemble, int) and self.ensemble >= 1):
            raise UserError(f"ensemble: expected a number of nets >= 1, got {self.ensemble!r}")
        self.calibration_ = None
        # which rows trained it: `solve` refuses to certify a budget on them (cross-fitting)
        self.training_rows_ = training_row_sample(table, seed=self.seed)
        rep, y_rep, self.label_info_ = _repeated_with_labels(table, self.label)
        true_q = self.label == TRUE_Q
        if true_q:  # every arm known: no propensity weights; rows without q_0 carry nothing
            if self.select != "outcome":
                raise UserError("select: label 'true-q' knows every arm's ΔQ and selects on its squared "
                                f"error; expected select='outcome', got {self.select!r}")
            known = np.isfinite(y_rep[:, 0])
            if not known.any():
                raise UserError("label 'true-q': no repeated request of the log has q_0")
            rep, y_rep = rep.filter(pa.array(known)), y_rep[known]
        rng = np.random.default_rng(self.seed)
        feats = features_from_log(rep)
        hist = feats["history"]
        self.vocab_ = Vocab(hist[hist >= 0])
        self.use_cache_state_ = has_cache_state(rep)
        X = self._tensors(feats)
        t = torch.from_numpy(rep["strategy"].to_numpy().astype(np.int64))
        y = torch.from_numpy(y_rep.astype(np.float32))
        w = (1.0 / rep["propensity"].to_numpy().astype(np.float32) if self.ipw and not true_q
             else np.ones(len(y), np.float32))
        w = torch.from_numpy(w / w.mean())
        sessions = rep["session_id"].to_numpy()
        uniq = np.unique(sessions)
        valid_sessions = rng.choice(uniq, max(1, int(len(uniq) * self.valid_fraction)), replace=False)
        is_valid = np.isin(sessions, valid_sessions)
        tr, va = np.flatnonzero(~is_valid), np.flatnonzero(is_valid)
        t0 = time.time()
        members, fits = [], []
        for m in range(self.ensemble):  # member 0 is the single model of ensemble = 1
            torch.manual_seed(self.seed + 7919 * m)
            self.net_ = EffectLossNet(len(self.vocab_), self.emb, self.hidden, self.n_experts,
                                      use_cache_state=self.use_cache_state_, list_origin=self.list_origin)
            desc = "train estimator" + (f" {m + 1}/{self.ensemble}" if self.ensemble > 1 else "")
            fits.append(self._fit_member(X, t, y, w, tr, va, rng if m == 0 else np.random.default_rng([self.seed, m]),
                                         desc))
            members.append(self.net_)
        if self.ensemble > 1:
            self.net_ = EnsembleNet(members)
            self.net_.eval()
        self.history_ = {"epochs": fits[0]["epochs"], "best_valid_loss": fits[0]["best_valid_loss"],
                         "train_rows": int(len(tr)), "valid_rows": int(len(va)),
                         "seconds": round(time.time() - t0, 1), "vocab_items": len(self.vocab_)}
        if self.ensemble > 1:
            self.history_["members"] = fits
        return self

    def _fit_member(self, X, t, y, w, tr: np.ndarray, va: np.ndarray, rng: np.random.Generator, desc: str) -> dict:
        """Train self.net_ (Adam, early stopping or epoch averaging); returns its epochs and the
        best validation figure."""
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        best, best_state, bad_epochs = np.inf, None, 0
        steps = max(1, len(tr) // self.batch_size)
        bar = tqdm(total=self.max_epochs * steps, desc=desc, unit="step",
                   disable=not self.progress, mininterval=1.0)
        epochs_run = 0
        averaged: dict[str, torch.Tensor] | None = None
        n_averaged = 0
        for epoch in range(self.max_epochs):
            self.net_.train()
            perm = rng.permutation(tr)
            for b in range(steps):
                sel = torch.from_numpy(perm[b * self.batch_size:(b + 1) * self.batch_size])
                loss = self._loss([x[sel] for x in X], t[sel], y[sel], w[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
            epochs_run = epoch + 1
            if self.average_epochs and epochs_run > self.max_epochs - self.average_epochs:
                state = self.net_.state_dict()
                averaged = ({k: v.detach().clone().double() for k, v in state.items()} if averaged is None
                            else {k: averaged[k] + v.detach().double() for k, v in state.items()})
                n_averaged += 1
            vl = self._valid_loss(X, t, y, w, va) if self.select == "outcome" else self._valid_uplift(X, t, y, w, va)
            bar.set_postfix(valid=f"{vl:.4f}", refresh=False)
            if epochs_run < self.min_epochs or self.average_epochs:  # averaging runs every epoch
                continue
            if vl < best - 1e-5:
                best, bad_epochs = vl, 0
                best_state = {k: v.clone() for k, v in self.net_.state_dict().items()}
            else:
                bad_epochs += 1
                if bad_epochs >= self.patience:
                    break
        bar.close()
        if averaged is not None:
            ref = self.net_.state_dict()
            self.net_.load_state_dict({k: (v / n_averaged).to(ref[k].dtype) for k, v in averaged.items()})
            best = self._valid_loss(X, t, y, w, va)
        elif best_state is not None:
            self.net_.load_state_dict(best_state)
        self.net_.eval()
        return {"epochs": epochs_run, "best_valid_loss": float(best)}

    def _tensors(self, feats: dict[str, np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(feats["user_features"]), torch.from_numpy(self.vocab_.index(feats["history"])),
                torch.from_numpy(feats["request_features"]), torch.from_numpy(feats["cache_state"])]

    def _loss(self, X, t, y, w) -> torch.Tensor:
        logits = self.net_.logits(*X)
        if y.dim() == 2:  # label "true-q"
            level, uplift = _true_q_errors(logits, y)
            return (level + TRUE_Q_UPLIFT_WEIGHT * uplift).mean()
        lt = logits.gather(1, t[:, None]).squeeze(1)
        if self.label == "clicks":
            return (w * (torch.exp(lt) - y * lt)).mean()  # Poisson NLL, log link
        # View-adjusted labels can be negative. The Poisson loss is then unbounded below per
        # row (l -> -inf), and the net memorises those rows (measured: the validation loss
        # rose from epoch 3 and blew up at 5). Squared error also has its minimum at E[y | x]
        # and is bounded.
        return (w * (torch.exp(lt) - y) ** 2).mean()

    def _valid_loss(self, X, t, y, w, idx) -> float:
        """The training loss on the validation rows; for "true-q" the squared error of ΔQ̂ alone
        (the levels are not what the policy ranks by)."""
        self.net_.eval()
        with torch.no_grad():
            tot = 0.0
            for b in range(0, len(idx), 8192):
                sel = torch.from_numpy(idx[b:b + 8192])
                Xs = [x[sel] for x in X]
                v = (_true_q_errors(self.net_.logits(*Xs), y[sel])[1].mean() if y.dim() == 2
                     else self._loss(Xs, t[sel], y[sel], w[sel]))
                tot += float(v) * len(sel)
        return tot / max(1, len(idx))

    def _valid_uplift(self, X, t, y, w, idx) -> float:
        """−Σ_j Qini_j of ΔQ̂_j on the validation rows (lower is better; evaluation.py)."""
        from .evaluation import evaluate_uplift

        self.net_.eval()
        with torch.no_grad():
            dq = np.concatenate([self.net_(*[x[torch.from_numpy(idx[b:b + 8192])] for x in X])[1].numpy()
                                 for b in range(0, len(idx), 8192)])
        tt = t[idx].numpy()
        present = np.bincount(tt, minlength=N_RECYCLE + 1) > 0
        if not present.all():
            return float("nan")
        p = 1.0 / w[idx].numpy().astype(np.float64)  # w ∝ 1/propensity; the metrics are scale-free
        res = evaluate_uplift(dq, tt, y[idx].numpy(), p / p.max())
        return -float(sum(r["qini"] for r in res["per_treatment"].values()))

    # ---- prediction ------------------------------------------------------------------------
    def predict(self, features: dict[str, np.ndarray], raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw served arrays -> (Q [n, K+1], ΔQ [n, K]); calibrated when a calibration is
        attached (`calibrate`), unless raw.

        A saved or loaded estimator runs its ONNX graph with onnxruntime (the graph the router
        serves; ~6x faster than torch's CPU GRU here, equal to 1e-5); otherwise torch."""
        session = None if raw else self._onnx_session()  # raw: torch (the graph carries the calibration)
        if session is not None:
            names = [i.name for i in session.get_inputs()]
            n = len(features["history"])
            qs, dqs = [], []
            for b in range(0, n, ORT_CHUNK):
                q, dq = session.run(["q", "delta_q"], {k: np.ascontiguousarray(features[k][b:b + ORT_CHUNK])
                                                       for k in names})
                qs.append(q)
                dqs.append(dq)
            if not qs:
                return np.zeros((0, self.net_.k + 1), np.float32), np.zeros((0, self.net_.k), np.float32)
            return np.concatenate(qs), np.concatenate(dqs)
        X = self._tensors(features)
        qs, dqs = [], []
        with torch.no_grad():
            for b in range(0, X[0].shape[0], 8192):
                q, dq = self.net_(*[x[b:b + 8192] for x in X])
                qs.append(q.numpy())
                dqs.append(dq.numpy())
        q, dq = np.concatenate(qs), np.concatenate(dqs)
        cal = getattr(self, "calibration_", None)
        if cal is not None and not raw:
            q, dq = cal.apply(q, dq, features["cache_state"])
        return q, dq

    def _onnx_session(self):
        """An onnxruntime session on the estimator's saved graph, when it matches the net and its
        calibration (set by save/load, cleared by fit/calibrate); None otherwise."""
        path = getattr(self, "onnx_path_", None)
        if path is None or getattr(self, "calibration_", None) is not getattr(self, "onnx_calibration_", None):
            return None  # no saved graph, or a calibration attached since it was written
        if getattr(self, "_ort", None) is None or self._ort[0] != path:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, torch.get_num_threads())
            self._ort = (path, ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
        return self._ort[1]

    def predict_log(self, table: pa.Table, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return self.predict(features_from_log(table), raw=raw)

    def calibrate(self, table: pa.Table, label: str | None = None, **options) -> "EffectLossEstimator":
        """Fit the per-depth calibration (calibration.py) on the repeated requests of a
        randomised log that the estimator was not trained on; replaces any earlier one.
        label: the reward its doubly-robust means use (labels.py); default the training label."""
        if self.label == TRUE_Q:
            raise UserError("a 'true-q' estimator is the feature ceiling fitted to exact q_j; a calibration on "
                            "logged clicks would add their noise to it (calibrate estimators trained on clicks)")
        validate_training_log(table, where="calibration log")
        if not has_cache_state(table):
            raise LogError("calibration log: needs the cache_state column (depth of the cached lists)")
        rep, y_rep, _ = _repeated_with_labels(table, label or self.label)
        feats = features_from_log(rep)
        q, dq = self.predict(feats, raw=True)
        self.onnx_path_ = None  # the saved graph no longer carries this calibration
        self.calibration_ = fit_depth_calibration(
            q, dq, feats["cache_state"], rep["strategy"].to_numpy(), y_rep,
            rep["propensity"].to_numpy(), **options)
        return self

    # ---- export ----------------------------------------------------------------------------
    def export_onnx(self, path: str | Path) -> Path:
        import warnings

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ex = (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 4),
              torch.full((2, CACHE_STATE.dims[0]), -1.0))
        tmp = path.with_suffix(".raw.onnx")
        names = ["user_features", "history" + IDX, "request_features", "cache_state"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation + GRU tracer notes
            torch.onnx.export(self.net_, ex, str(tmp), input_names=names,
                              output_names=[o.name for o in ESTIMATOR_OUTPUTS],
                              dynamic_axes={"user_features": {0: "batch"}, "history" + IDX: {0: "batch", 1: "len"},
                                            "request_features": {0: "batch"}, "cache_state": {0: "batch"},
                                            "q": {0: "batch"},
                                            "delta_q": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        model = graft(onnx.load(str(tmp)), ESTIMATOR_INPUTS, {"history": self.vocab_})
        if getattr(self, "calibration_", None) is not None:
            model = graft_calibration(model, self.calibration_)
        tmp.unlink()
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
        return path

    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.export_onnx(out / "estimator.onnx")
        self.onnx_path_ = out / "estimator.onnx"  # predict() runs it from now on
        self.onnx_calibration_ = getattr(self, "calibration_", None)
        torch.save(self.net_.state_dict(), out / "estimator.pt")
        np.save(out / "item_vocab.npy", self.vocab_.ids)
        params = {k: getattr(self, k) for k in ("emb", "hidden", "n_experts", "lr", "batch_size", "max_epochs",
                                                 "patience", "min_epochs", "valid_fraction", "ipw", "seed",
                                                 "list_origin", "label", "average_epochs", "select", "ensemble")}
        cal = getattr(self, "calibration_", None)
        if cal is not None:
            (out / "calibration.json").write_text(cal.to_json())
        elif (out / "calibration.json").exists():
            (out / "calibration.json").unlink()
        manifest = {"params": params, "fit": self.history_,
                    "label_info": getattr(self, "label_info_", {}), "uses_cache_state": self.use_cache_state_,
                    "calibrated": cal is not None, "training_rows": getattr(self, "training_rows_", []),
                    **(extra or {})}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "EffectLossEstimator":
        out = Path(out_dir)
        m = json.loads((out / "manifest.json").read_text())
        est = cls(**{"list_origin": False, **m["params"]})
        est.vocab_ = Vocab(np.load(out / "item_vocab.npy"))
        est.use_cache_state_ = bool(m.get("uses_cache_state", False))
        nets = [EffectLossNet(len(est.vocab_), est.emb, est.hidden, est.n_experts,
                              use_cache_state=est.use_cache_state_, list_origin=est.list_origin)
                for _ in range(est.ensemble)]
        est.net_ = nets[0] if est.ensemble == 1 else EnsembleNet(nets)
        est.net_.load_state_dict(torch.load(out / "estimator.pt", weights_only=True))  # tensors only, no pickle code
        est.net_.eval()
        est.history_ = m.get("fit", {})
        cal = out / "calibration.json"
        est.calibration_ = DepthCalibration.from_json(cal.read_text()) if cal.exists() else None
        est.manifest_ = m
        est.training_rows_ = m.get("training_rows", [])
        est.onnx_path_ = out / "estimator.onnx" if (out / "estimator.onnx").exists() else None
        est.onnx_calibration_ = est.calibration_
        return est
