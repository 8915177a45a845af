"""The reference VLA: camera image(s) + instruction + proprioceptive state (+ optional action
prefix) -> a Gaussian over a chunk of H normalized actions, and a feature vector for the
verifier. Small enough to train and serve on a CPU.

Prefix conditioning (training-time real-time chunking): rows ``t < prefix_len`` of the output
mean are the prefix itself (already committed actions), so a new chunk continues the executing
one; the network sees the prefix and its length and learns to continue it smoothly.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0


@dataclasses.dataclass(frozen=True)
class VLAConfig:
    horizon: int = 8
    action_dim: int = 4
    state_dim: int = 4
    cameras: tuple[str, ...] = ("front",)
    image_hw: tuple[int, int] = (48, 48)
    channels: int = 3
    max_tokens: int = 32
    vocab: int = 257
    width: int = 128
    features: int = 64
    init_log_std: float = -1.0
    trunk_width: int = 256   # the MLP trunk; widen/deepen for the large-policy GPU benchmark
    trunk_layers: int = 2
    # correlation of the exploration noise between a chunk's rows (runtime/distributions.py;
    # exported as the manifest's outputs.row_correlation): 0 = independent rows
    row_correlation: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.row_correlation < 1.0:
            raise ValueError(f"VLAConfig: row_correlation must be in [0, 1): {self}")
        if self.horizon < 2 or self.action_dim < 1 or not self.cameras:
            raise ValueError(f"VLAConfig: need horizon >= 2, action_dim >= 1 and a camera: {self}")
        if self.trunk_width < 1 or self.trunk_layers < 1:
            raise ValueError(f"VLAConfig: trunk_width and trunk_layers must be >= 1: {self}")


class SpatialSoftmax(nn.Module):
    """Expected (x, y) image coordinates per channel: a cheap, localization-friendly pooling.

    The softmax has a learned temperature (one per encoder, as in Levine et al.'s deep spatial
    autoencoders): the readout sharpens onto the feature peak instead of being pulled towards
    the image centre by the background. Behaviour cloning on the Meta-World demonstrations, side
    by side (4,000 steps, 30 evaluation episodes per task, mean actions): reach 0.30 -> 0.50,
    push 0.30 -> 0.47, door-open 0.97 either way (with the fleet's sampled actions and
    asynchronous chunks, sim.learning_lab: 0.44 against 0.46 on reach and push, no gain). ``log_temperature`` starts at 0 (temperature 1, the pooling
    without it), so a checkpoint saved before it existed loads unchanged."""

    def __init__(self):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "log_temperature", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        logits = x.reshape(b, c, h * w) * torch.exp(self.log_temperature)
        attn = torch.softmax(logits, dim=-1).reshape(b, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).reshape(1, 1, h, 1)
        xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).reshape(1, 1, 1, w)
        return torch.cat([(attn * xs).sum((2, 3)), (attn * ys).sum((2, 3))], dim=1)


class ImageEncoder(nn.Module):
    def __init__(self, channels: int, out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1, padding=1),
        )
        self.pool = SpatialSoftmax()
        self.proj = nn.Linear(64, out)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.pool(self.net(image))))


class ReferenceVLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        c = config
        self.config = c
        self.encoders = nn.ModuleDict({name: ImageEncoder(c.channels, c.width) for name in c.cameras})
        self.embed = nn.Embedding(c.vocab, 32, padding_idx=0)
        self.text = nn.Linear(32, c.width)
        self.state = nn.Linear(c.state_dim, c.width)
        self.prefix = nn.Linear(c.horizon * (c.action_dim + 1), c.width)
        tw = c.trunk_width
        layers = [nn.Linear(c.width * (len(c.cameras) + 3), tw), nn.ReLU()]
        for _ in range(c.trunk_layers - 1):
            layers += [nn.Linear(tw, tw), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.mean_head = nn.Linear(tw, c.horizon * c.action_dim)
        self.feature_head = nn.Linear(tw, c.features)
        self.log_std = nn.Parameter(torch.full((c.horizon, c.action_dim), c.init_log_std))
        self.value_head = nn.Sequential(nn.Linear(tw, 128), nn.ReLU(), nn.Linear(128, 1))

    def encode(self, images: dict) -> dict:
        """cam -> the encoder's features [B, width]. ``forward`` takes them in place of the
        images (an ``images`` entry of 2 dims is taken as encoded): with the encoders frozen,
        the learner encodes a batch once for all its passes (``learner.batches.Batch.encoded``),
        as the convolutions are ~95 % of a forward pass at 48x48."""
        return {name: self.encoders[name](images[name]) for name in self.config.cameras}

    def _trunk(self, images: dict, state, tokens, prefix, prefix_len):
        c = self.config
        parts = [images[name] if images[name].dim() == 2 else self.encoders[name](images[name])
                 for name in c.cameras]
        mask = (tokens > 0).to(state.dtype).unsqueeze(-1)
        text = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        parts.append(torch.relu(self.text(text)))
        parts.append(torch.relu(self.state(state)))
        steps = torch.arange(c.horizon, device=state.device).reshape(1, c.horizon)
        committed = (steps < prefix_len.reshape(-1, 1)).to(state.dtype)  # [B, H]
        pre = torch.cat([prefix * committed.unsqueeze(-1), committed.unsqueeze(-1)], dim=-1)
        parts.append(torch.relu(self.prefix(pre.flatten(1))))
        return self.trunk(torch.cat(parts, dim=-1)), committed

    def _policy(self, h, committed, prefix):
        c = self.config
        mean = torch.tanh(self.mean_head(h)).reshape(-1, c.horizon, c.action_dim)
        mean = torch.where(committed.unsqueeze(-1) > 0, prefix, mean)
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).unsqueeze(0).expand_as(mean)
        return mean, log_std

    def forward(self, images: dict, state, tokens, prefix, prefix_len):
        """Returns (mean [B,H,A], log_std [B,H,A], features [B,F]); inputs as in the ONNX contract."""
        h, committed = self._trunk(images, state, tokens, prefix, prefix_len)
        mean, log_std = self._policy(h, committed, prefix)
        return mean, log_std, self.feature_head(h)

    def policy_and_value(self, images: dict, state, tokens, prefix, prefix_len, *,
                         detach_value: bool = False):
        """(mean, log_std, value [B]) from one trunk pass, for training (value is not exported).
        ``detach_value``: the value loss trains only the value head, not the shared trunk."""
        h, committed = self._trunk(images, state, tokens, prefix, prefix_len)
        mean, log_std = self._policy(h, committed, prefix)
        return mean, log_std, self.value_head(h.detach() if detach_value else h).squeeze(-1)


def gaussian_log_prob(mean, log_std, actions, row_mask, rho: float = 0.0):
    """[B] log-probabilities of the executed rows (row_mask [B,H] in {0,1}) under the chunk
    Gaussian whose rows correlate by ``rho`` (runtime/distributions.py has the formula); with
    rho = 0, the sum over those rows of log N(actions | mean, exp(log_std))."""
    z = (actions - mean) * torch.exp(-log_std)
    if not rho:
        per_row = (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return (per_row * row_mask).sum(-1)
    b = float(rho) ** 2
    c = 1.0 - b
    m = row_mask.unsqueeze(-1)                                   # [B, H, 1]
    n = row_mask.sum(-1, keepdim=True)                           # [B, 1]
    zm = z * m
    quad = ((zm * zm).sum(1) - b * zm.sum(1) ** 2 / (c + n * b)) / c   # [B, A]
    logdet = (n - 1) * math.log(c) + torch.log(c + n * b)              # [B, 1]
    a_dim = z.shape[-1]
    return ((-0.5 * quad).sum(-1) - 0.5 * a_dim * logdet.squeeze(-1)
            - (log_std * m).sum((1, 2)) - 0.5 * a_dim * n.squeeze(-1) * math.log(2 * math.pi))
