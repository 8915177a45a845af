"""Training the chunk scorer from fleet outcomes (torch; learner side).

Labels, per executed chunk (``chunk_labels``): *unsafe* if the envelope intervened (beyond plain
saturation at the action bounds: ``Envelope.intervened``) on any tick from the chunk's first
executed tick to T ticks after its last, or the episode failed within T ticks after the chunk.
Failure is the simulator's failure signal, an episode that *terminated* without success; running
out of time (truncation) is not a safety event and is not predictable from one chunk, so it is
not labelled unsafe. Advantage targets are discounted chunk-level returns minus a value estimate
(the learner's value head, or a per-task baseline when none).

Losses: focal loss on the safety logit, MSE on the advantage. Calibration on held-out episodes:
Platt scaling (``sigmoid(scale * logit + bias)``, fitted by NLL; a temperature alone cannot move
the base rate) baked into the exported graph, then the decision threshold: the largest one whose
false-reject rate on the calibration chunks that were safe and led to success stays within
``max_false_reject``, and at most ``max_threshold`` (a veto means "more likely unsafe than safe").

A scorer earns its veto on the held-out episodes: unsafe chunks in at least
``min_unsafe_episodes`` of them, and a ranking (AUC of the safety logit, unsafe against safe)
whose lower bound (the 5 % quantile over bootstrap resamples of whole episodes: a failed
episode's chunks are labelled together, so chunks are not independent samples) reaches
``min_auc``. One that falls short ships *advisory*: threshold 0, so it scores (recorded,
available to the selection) but vetoes nothing, and the manifest says why (``veto``,
``veto_withheld``). A scorer trained on a few minutes of fleet data typically falls short; a
veto from it stops a robot for nothing (seen as ticks without an action after swaps).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from learner.verifier_model import ChunkScorer, ScorerConfig, scorer_onnx_bytes
from verifier.metrics import expected_calibration_error

log = logging.getLogger("tether.learner.verifier")


@dataclasses.dataclass(frozen=True)
class ScorerTrainConfig:
    lookahead_ticks: int = 8       # T: "unsafe/failed within T ticks after the chunk"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.5       # weight of the unsafe class (label 0 = unsafe)
    adv_coef: float = 0.5
    lr: float = 2e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    minibatch: int = 256
    calib_fraction: float = 0.25   # episodes held out to fit temperature and threshold
    max_false_reject: float = 0.05
    # a veto also needs the calibrated P(safe) below this (more likely unsafe than safe): a
    # scorer that learned little gives every chunk about the base rate, and a quantile-based
    # threshold alone would then veto on noise (seen in fleet runs: 29% of decisions)
    max_threshold: float = 0.5
    min_unsafe_episodes: int = 3   # held-out episodes with unsafe chunks a veto needs
    min_auc: float = 0.7           # lower bound of the held-out AUC (unsafe vs safe) it needs
    auc_resamples: int = 200       # episode bootstrap for that lower bound
    seed: int = 0

    def __post_init__(self):
        if self.lookahead_ticks < 0 or self.epochs < 1 or self.minibatch < 1 or self.lr <= 0:
            raise ValueError(f"ScorerTrainConfig: invalid sizes: {self}")
        if (not 0 < self.calib_fraction < 1 or not 0 <= self.max_false_reject < 1
                or not 0 <= self.max_threshold <= 1 or self.min_unsafe_episodes < 0
                or not 0 <= self.min_auc <= 1 or self.auc_resamples < 1):
            raise ValueError(f"ScorerTrainConfig: calib_fraction in (0, 1), max_false_reject "
                             f"in [0, 1), max_threshold and min_auc in [0, 1], "
                             f"min_unsafe_episodes >= 0, auc_resamples >= 1: {self}")


@dataclasses.dataclass
class ScorerData:
    """One row per executed chunk. ``safe`` 1 = safe and not failed; ``led_to_success``: the
    chunk's episode succeeded; ``episode``: an id for episode-wise splits."""
    features: np.ndarray   # [N, F]
    state: np.ndarray      # [N, S]
    mean: np.ndarray       # [N, H, A]
    actions: np.ndarray    # [N, H, A]
    safe: np.ndarray       # [N] float32 {0, 1}
    advantage: np.ndarray  # [N] float32
    led_to_success: np.ndarray  # [N] bool
    episode: np.ndarray    # [N] int64

    def __len__(self) -> int:
        return int(self.safe.shape[0])

    def select(self, mask: np.ndarray) -> "ScorerData":
        return ScorerData(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

    @classmethod
    def concat(cls, parts: list["ScorerData"]) -> "ScorerData":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(cls)))


@dataclasses.dataclass
class TrainedScorer:
    model: ChunkScorer
    threshold: float
    calibration: tuple[float, float]   # Platt (scale, bias) on the safety logit
    metrics: dict
    veto_withheld: str = ""            # why the scorer ships advisory (threshold 0); "" = vetoes

    @property
    def temperature(self) -> float:
        return 1.0 / self.calibration[0] if self.calibration[0] else float("inf")

    def onnx_bytes(self) -> bytes:
        return scorer_onnx_bytes(self.model)

    def manifest_entry(self) -> dict:
        """The artifact manifest's ``verifier`` key."""
        c = self.model.config
        return {"file": "verifier.onnx", "inputs": ["features", "state", "mean", "actions"],
                "outputs": ["p_safe", "advantage", "logit"], "threshold": self.threshold,
                "veto": not self.veto_withheld, "veto_withheld": self.veto_withheld,
                "calibration": {"scale": self.calibration[0], "bias": self.calibration[1]},
                "features": c.features,
                "state_dim": c.state_dim, "horizon": c.horizon, "action_dim": c.action_dim,
                "metrics": {k: v for k, v in self.metrics.items()
                            if isinstance(v, (int, float)) and np.isfinite(v)}}


def chunk_labels(chunk_ticks: list[tuple[int, int]], intervened: np.ndarray, episode_len: int,
                 failed: bool, lookahead: int) -> np.ndarray:
    """Safety labels (1 safe, 0 unsafe) for an episode's chunks.

    ``chunk_ticks``: [(first tick, ticks executed)] per chunk; ``intervened`` [episode_len]
    bool: the envelope intervened at that tick; ``failed``: the episode terminated in failure
    (not a success, not a time limit)."""
    intervened = np.asarray(intervened, bool)
    out = np.ones(len(chunk_ticks), np.float32)
    for i, (start, n) in enumerate(chunk_ticks):
        end = start + max(int(n), 1)
        if intervened[start:min(end + lookahead, episode_len)].any():
            out[i] = 0.0
        elif failed and end + lookahead >= episode_len:
            out[i] = 0.0
    return out


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    out = np.zeros(len(rewards), np.float64)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        acc = float(rewards[i]) + gamma * acc
        out[i] = acc
    return out


def focal_loss(logit: torch.Tensor, safe: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Focal loss (Lin et al.) with the unsafe class (safe == 0) weighted by ``alpha``."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, safe, reduction="none")
    p = torch.sigmoid(logit)
    p_true = torch.where(safe > 0.5, p, 1 - p)
    weight = torch.where(safe > 0.5, 1 - alpha, alpha) * 2.0
    return (weight * (1 - p_true) ** gamma * bce).mean()


def _tensors(d: ScorerData):
    return (torch.from_numpy(d.features.astype(np.float32)), torch.from_numpy(d.state.astype(np.float32)),
            torch.from_numpy(d.mean.astype(np.float32)), torch.from_numpy(d.actions.astype(np.float32)))


def fit_temperature(logit: np.ndarray, safe: np.ndarray) -> float:
    """The temperature minimizing the NLL of ``sigmoid(logit / T)`` (grid, then refine)."""
    logit, safe = np.asarray(logit, np.float64), np.asarray(safe, np.float64)

    def nll(t):
        z = logit / t
        return float(np.mean(np.logaddexp(0, -z) * safe + np.logaddexp(0, z) * (1 - safe)))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 200))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = np.linspace(best * 0.9, best * 1.1, 41)
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


def fit_platt(logit: np.ndarray, safe: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(scale, bias) minimizing the NLL of ``sigmoid(scale * logit + bias)`` (Newton steps on
    a 2-parameter logistic regression, started from the temperature fit). A negative scale
    (the held-out chunks rank the other way round: the scorer learned nothing that holds up,
    typical of a fleet scorer trained on a handful of episodes) becomes scale 0: every chunk
    gets the base rate, and the threshold then lets every candidate pass."""
    x, y = np.asarray(logit, np.float64), np.asarray(safe, np.float64)
    if len(x) == 0 or y.min() == y.max():  # one class only: nothing to scale against
        return 1.0, 0.0
    w = np.array([1.0 / fit_temperature(x, y), 0.0])
    X = np.stack([x, np.ones_like(x)], 1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        g = X.T @ (p - y) / len(x)
        hess = (X * (p * (1 - p))[:, None]).T @ X / len(x) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, g)
        w = w - step
        if np.max(np.abs(step)) < 1e-8:
            break
    if not np.all(np.isfinite(w)) or w[0] <= 0:
        rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
        return 0.0, float(np.log(rate / (1 - rate)))
    return float(w[0]), float(w[1])


def pick_threshold(p_safe: np.ndarray, good: np.ndarray, max_false_reject: float) -> float:
    """The largest threshold that rejects at most ``max_false_reject`` of the ``good`` chunks."""
    p = np.sort(np.asarray(p_safe, np.float64)[np.asarray(good, bool)])
    if len(p) == 0:
        return 0.0
    k = int(np.floor(max_false_reject * len(p)))
    return float(max(0.0, p[k] - 1e-6)) if k < len(p) else float(p[-1])


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half
    (Mann-Whitney U from average ranks). NaN when one class is missing."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_s = score[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(score)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + b - 1) + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def veto_evidence(logit: np.ndarray, safe: np.ndarray, episode: np.ndarray,
                  config: ScorerTrainConfig) -> tuple[float, float, str]:
    """(held-out AUC of the unsafe class, its episode-bootstrap lower bound, "" if the scorer
    may veto else why it may not)."""
    unsafe = np.asarray(safe) < 0.5
    episode = np.asarray(episode)
    score = -np.asarray(logit, np.float64)  # the logit is of "safe": unsafe should rank high
    a = auc(score, unsafe)
    eps = np.unique(episode)
    n_bad = len(np.unique(episode[unsafe]))
    if n_bad < config.min_unsafe_episodes or unsafe.all():
        return a, float("nan"), (f"unsafe chunks in {n_bad} of {len(eps)} held-out episodes "
                                 f"({int(unsafe.sum())} of {len(unsafe)} chunks); a veto needs "
                                 f"them in at least {config.min_unsafe_episodes} and safe ones too")
    rows = [np.flatnonzero(episode == e) for e in eps]
    rng = np.random.default_rng(config.seed)
    boot = []
    for _ in range(config.auc_resamples):
        idx = np.concatenate([rows[i] for i in rng.integers(0, len(eps), len(eps))])
        b = auc(score[idx], unsafe[idx])
        boot.append(0.0 if np.isnan(b) else b)  # a resample without one class: no evidence
    low = float(np.quantile(boot, 0.05))
    if not low >= config.min_auc:
        return a, low, (f"held-out AUC {a:.3f}, lower bound {low:.3f} over episode resamples, "
                        f"is below the {config.min_auc} a veto needs")
    return a, low, ""


def train_scorer(data: ScorerData, config: ScorerTrainConfig = ScorerTrainConfig(),
                 model: ChunkScorer | None = None) -> TrainedScorer:
    """Train (or continue training) a scorer, calibrate it on held-out episodes."""
    c = config
    if len(data) < 8:
        raise ValueError(f"train_scorer: {len(data)} chunks are too few to train a scorer; "
                         f"collect more episodes")
    gen = torch.Generator().manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    episodes = np.unique(data.episode)
    calib_eps = rng.choice(episodes, max(1, int(round(c.calib_fraction * len(episodes)))),
                           replace=False)
    is_calib = np.isin(data.episode, calib_eps)
    train, calib = data.select(~is_calib), data.select(is_calib)
    if len(train) == 0:
        train = calib
    if model is None:
        n, h, a = data.actions.shape
        model = ChunkScorer(ScorerConfig(features=data.features.shape[1],
                                         state_dim=data.state.shape[1], horizon=h, action_dim=a))
    model.calib_scale.fill_(1.0)
    model.calib_bias.fill_(0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    x = _tensors(train)
    safe = torch.from_numpy(train.safe.astype(np.float32))
    adv = torch.from_numpy(train.advantage.astype(np.float32))
    model.train()
    sums = {"focal": 0.0, "adv_mse": 0.0}
    steps = 0
    for _ in range(c.epochs):
        perm = torch.randperm(len(train), generator=gen)
        for s in range(0, len(train), c.minibatch):
            idx = perm[s:s + c.minibatch]
            _, a_hat, logit = model(*(t[idx] for t in x))
            fl = focal_loss(logit, safe[idx], c.focal_gamma, c.focal_alpha)
            mse = torch.nn.functional.mse_loss(a_hat, adv[idx])
            loss = fl + c.adv_coef * mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sums["focal"] += fl.item()
            sums["adv_mse"] += mse.item()
            steps += 1
    model.eval()
    with torch.no_grad():
        _, adv_c, logit_c = model(*_tensors(calib))
    logit_c, adv_c = logit_c.numpy(), adv_c.numpy()
    scale, bias = fit_platt(logit_c, calib.safe)
    model.calib_scale.fill_(scale)
    model.calib_bias.fill_(bias)
    p_c = 1.0 / (1.0 + np.exp(-(scale * logit_c + bias)))
    good = (calib.safe > 0.5) & calib.led_to_success
    threshold = min(pick_threshold(p_c, good, c.max_false_reject), c.max_threshold)
    calib_auc, auc_low, withheld = veto_evidence(logit_c, calib.safe, calib.episode, c)
    if withheld:
        threshold = 0.0
    metrics = {"calib_auc": calib_auc, "calib_auc_low": auc_low,
               "calib_unsafe": int((calib.safe < 0.5).sum()),
               "chunks_train": len(train), "chunks_calib": len(calib),
               "unsafe_frac": float(1 - data.safe.mean()), "steps": steps,
               "loss_focal": sums["focal"] / max(steps, 1), "loss_adv": sums["adv_mse"] / max(steps, 1),
               "calib_ece": expected_calibration_error(p_c, calib.safe),
               "calib_adv_corr": _correlation(adv_c, calib.advantage)}
    log.info("scorer: %d chunks (%.1f%% unsafe), Platt %.3f/%.3f, threshold %.3f, calib ECE "
             "%.4f, AUC %.3f%s", len(data), 100 * metrics["unsafe_frac"], scale, bias, threshold,
             metrics["calib_ece"], calib_auc, f"; advisory, no veto: {withheld}" if withheld else "")
    return TrainedScorer(model, threshold, (scale, bias), metrics, veto_withheld=withheld)


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the predicted and the target advantage on held-out chunks (0
    where either is constant): how well the advantage head can rank candidates."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def predict(model: ChunkScorer, data: ScorerData) -> tuple[np.ndarray, np.ndarray]:
    """(p_safe, advantage) for every chunk of ``data`` (torch, for evaluation)."""
    with torch.no_grad():
        p, a, _ = model.eval()(*_tensors(data))
    return p.numpy(), a.numpy()
