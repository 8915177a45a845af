"""The learned chunk scorer (torch side): features + state + candidate chunk -> P(safe) and an
advantage estimate, for K candidates in one batched call.

Inputs (all from the policy's own outputs, so no second vision backbone runs):
  features float32 [B, F]     the policy graph's ``features`` output
  state    float32 [B, S]     normalized proprioceptive state (the policy's input)
  mean     float32 [B, H, A]  the policy's chunk mean (normalized); context for the candidate
  actions  float32 [B, H, A]  the candidate chunk (normalized)
Outputs:
  p_safe    float32 [B]  calibrated probability that executing the chunk stays safe (no
                         envelope intervention, no failure) for the next T ticks
  advantage float32 [B]  estimated advantage of the chunk (normalized return units)
  logit     float32 [B]  the uncalibrated safety logit (for diagnostics)

The calibration (Platt: ``p_safe = sigmoid(scale * logit + bias)``) is a pair of buffers of
the module, so the exported graph emits calibrated probabilities directly.
"""
from __future__ import annotations

import dataclasses
import io
import warnings

import torch
from torch import nn

OPSET = 17
INPUTS = ("features", "state", "mean", "actions")
OUTPUTS = ("p_safe", "advantage", "logit")


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    features: int = 64
    state_dim: int = 4
    horizon: int = 8
    action_dim: int = 4
    width: int = 128

    def __post_init__(self):
        if min(self.features, self.state_dim, self.horizon, self.action_dim, self.width) < 1:
            raise ValueError(f"ScorerConfig: every size must be >= 1: {self}")


class ChunkScorer(nn.Module):
    def __init__(self, config: ScorerConfig):
        super().__init__()
        c = self.config = config
        chunk = c.horizon * c.action_dim
        self.context = nn.Sequential(nn.Linear(c.features + c.state_dim, c.width), nn.ReLU())
        # the candidate as itself and as its deviation from the policy's mean, per row
        self.chunk = nn.Sequential(nn.Linear(3 * chunk, c.width), nn.ReLU())
        self.body = nn.Sequential(nn.Linear(2 * c.width, c.width), nn.ReLU(),
                                  nn.Linear(c.width, c.width), nn.ReLU())
        self.safety = nn.Linear(c.width, 1)
        self.adv = nn.Linear(c.width, 1)
        self.register_buffer("calib_scale", torch.ones(()))
        self.register_buffer("calib_bias", torch.zeros(()))

    def forward(self, features, state, mean, actions):
        dev = actions - mean
        chunk = torch.cat([actions.flatten(1), dev.flatten(1), (dev * dev).flatten(1)], dim=-1)
        h = self.body(torch.cat([self.context(torch.cat([features, state], -1)),
                                 self.chunk(chunk)], -1))
        logit = self.safety(h).squeeze(-1)
        p_safe = torch.sigmoid(self.calib_scale * logit + self.calib_bias)
        return p_safe, self.adv(h).squeeze(-1), logit


def scorer_onnx_bytes(model: ChunkScorer) -> bytes:
    c = model.config
    model = model.eval()
    b = 3
    inputs = (torch.zeros(b, c.features), torch.zeros(b, c.state_dim),
              torch.zeros(b, c.horizon, c.action_dim), torch.zeros(b, c.horizon, c.action_dim))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buf, input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes={n: {0: "batch"} for n in INPUTS + OUTPUTS},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()
