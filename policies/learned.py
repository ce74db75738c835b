"""A learned policy served from an exported artifact: observation encoder, actor MLP, codec.

The network is the actor half of a stable-baselines3 ``ActorCriticPolicy`` on a ``Box``
observation and a ``MultiDiscrete`` action space: ``policy_net`` (Linear, activation, ...) then
``action_net`` (Linear to ``sum(nvec)`` logits, one slice per action component). It is
rebuilt here from a JSON description and safetensors weights, so serving needs neither
stable-baselines3 nor pickle (``policies.export.load_policy`` builds one).

Acting is deterministic: each component's logits, with the codec's mask applied (-inf on
masked values), then argmax, as ``MaskablePPO.predict(..., deterministic=True)`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.errors import is_count
from lpenv.actions import ActionCodec
from lpenv.observation import ObservationSpec

# The activations stable-baselines3 users pass as ``policy_kwargs["activation_fn"]``.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity,
}


def is_idle(view: SchedulerView) -> bool:
    """Nothing decodes and no prefill batch is in flight."""
    return not view.decode_context_lens and not view.in_flight


def serving_mask(codec: ActionCodec, view: SchedulerView | None) -> np.ndarray:
    """The codec's mask as a policy that sees only the view can use it.

    The view does not say whether more requests will arrive, so waiting on an idle engine
    could wait forever: the serving path never waits while idle. Training masks the same way
    (``policies.sb3.ServingMask``), so the env and the server see the same policy.
    """
    can_wait = view is None or not is_idle(view)
    return codec.masks(view, can_wait)


@dataclass(frozen=True)
class NetworkSpec:
    """The actor MLP: ``input_dim`` -> hidden layers (each Linear + activation) -> logits."""

    input_dim: int
    hidden: tuple[int, ...]
    activation: str
    output_dims: tuple[int, ...]  # the MultiDiscrete nvec: one logit slice per component
    kind: str = "mlp"

    def __post_init__(self) -> None:
        if self.kind != "mlp":
            raise ValueError(f"network kind must be 'mlp', got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"network activation {self.activation!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        sizes = (self.input_dim, *self.hidden, *self.output_dims)
        if not all(is_count(n) for n in sizes):
            raise ValueError(f"network sizes must be positive integers, got input "
                             f"{self.input_dim}, hidden {self.hidden}, outputs {self.output_dims}")

    @classmethod
    def from_json(cls, d: dict) -> NetworkSpec:
        known = {"kind", "input_dim", "hidden", "activation", "output_dims"}
        missing, unknown = known - {"kind"} - set(d), set(d) - known
        if missing or unknown:
            raise ValueError(f"network description: missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        return cls(int(d["input_dim"]), tuple(int(n) for n in d["hidden"]), str(d["activation"]),
                   tuple(int(n) for n in d["output_dims"]), str(d.get("kind", "mlp")))

    def to_json(self) -> dict:
        return {"kind": self.kind, "input_dim": self.input_dim, "hidden": list(self.hidden),
                "activation": self.activation, "output_dims": list(self.output_dims)}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight names (those of ``ActorMLP.state_dict()``) and their shapes."""
        shapes, last = {}, self.input_dim
        for i, width in enumerate(self.hidden):
            shapes[f"policy_net.{2 * i}.weight"] = (width, last)
            shapes[f"policy_net.{2 * i}.bias"] = (width,)
            last = width
        shapes["action_net.weight"] = (sum(self.output_dims), last)
        shapes["action_net.bias"] = (sum(self.output_dims),)
        return shapes


class ActorMLP(nn.Module):
    """Named like stable-baselines3's ``mlp_extractor.policy_net`` and ``action_net``."""

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        last = spec.input_dim
        for width in spec.hidden:
            layers += [nn.Linear(last, width), ACTIVATIONS[spec.activation]()]
            last = width
        self.policy_net = nn.Sequential(*layers)
        self.action_net = nn.Linear(last, sum(spec.output_dims))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.action_net(self.policy_net(obs))


def masked_argmax(logits: np.ndarray, mask: np.ndarray, nvec: Sequence[int]) -> np.ndarray:
    """Argmax per component of ``logits`` (batch, sum(nvec)) with masked entries at -inf."""
    logits = np.where(mask, logits, -np.inf)
    bounds = np.cumsum([0, *nvec])
    parts = [logits[:, lo:hi].argmax(axis=1) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return np.stack(parts, axis=1).astype(np.int64)


class LearnedPolicy:
    """The policy protocol (``decide(view) -> Decision``) over an actor MLP."""

    mode = "layered"

    def __init__(self, obs_spec: ObservationSpec, codec: ActionCodec, net: ActorMLP,
                 name: str = "learned") -> None:
        if net.spec.input_dim != obs_spec.size:
            raise ValueError(f"network input {net.spec.input_dim} != observation size "
                             f"{obs_spec.size}")
        if list(net.spec.output_dims) != codec.nvec:
            raise ValueError(f"network outputs {list(net.spec.output_dims)} != action space "
                             f"MultiDiscrete({codec.nvec})")
        self.obs_spec, self.codec, self.net, self.name = obs_spec, codec, net.eval(), name

    @property
    def max_in_flight(self) -> int | None:
        """Trained without staggering (its mask never starts a batch while one is in flight):
        the engine need not ask meanwhile, as the env did not."""
        return None if self.codec.allow_stagger else 1

    def logits(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(-1, self.obs_spec.size)
        with torch.inference_mode():
            return self.net(x).numpy()

    def act(self, obs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Deterministic action(s) for observation(s) and flat mask(s) (all valid if None):
        shape (3,) for one observation, (n, 3) for a batch."""
        obs = np.asarray(obs, dtype=np.float32)
        logits = self.logits(obs)
        mask = (np.ones_like(logits, dtype=bool) if mask is None
                else np.asarray(mask, dtype=bool).reshape(logits.shape))
        actions = masked_argmax(logits, mask, self.codec.nvec)
        return actions[0] if obs.ndim == 1 else actions

    def decide(self, view: SchedulerView) -> Decision:
        action = self.act(self.obs_spec.encode(view), serving_mask(self.codec, view))
        return self.codec.decode(action, view, can_wait=not is_idle(view))

    __call__ = decide

    def __repr__(self) -> str:
        s = self.net.spec
        return (f"LearnedPolicy(name={self.name!r}, obs={s.input_dim}, hidden={list(s.hidden)}, "
                f"activation={s.activation!r}, actions={self.codec.nvec})")
