"""Ready-made networks for image observations.

:class:`ConvNet` is a small convolutional classifier/policy over images given as flat vectors
(scikit-learn's 8×8 digits), built only from layers that projection training supports
(:mod:`unitrain.rules.projection`), so every rule can train it.

:class:`NatureCNN` is the network of Mnih et al. 2015 ("Human-level control through deep
reinforcement learning"), the one Such et al. 2017 ("Deep Neuroevolution") evolve on Atari with
the Deep GA: three convolutions (32×8×8 stride 4, 64×4×4 stride 2, 64×3×3 stride 1), a 512-unit
fully connected layer and one output per action; about 1.7 M parameters with 18 actions.
With ``dueling=True`` its head is the dueling one below.

:class:`DuelingMLP` is the dueling architecture of Wang et al. 2016 ("Dueling Network
Architectures for Deep Reinforcement Learning", ICML) over flat observations: a shared trunk, then
a state value ``V(s)`` and advantages ``A(s, a)`` combined as ``Q(s, a) = V(s) + A(s, a) −
mean_a' A(s, a')``. Its output is one number per action like any discrete policy's, so every rule
can train it; DQN reads it as action values.

:class:`GRUPolicy` is a recurrent policy (an MLP encoder, a GRU, a linear head) for tasks that a
policy of the current observation alone cannot solve (see "Recurrent policies" in the guide).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from unitrain.envs.observation import flat_observation
from unitrain.policy.action import ACTION_STD
from unitrain.policy.module import RLModule
from unitrain.policy.nn import GRUCell, Step

__all__ = ["mlp", "ACTIVATIONS", "MLPPolicy", "GRUPolicy", "ConvNet", "NatureCNN", "DuelingHead",
           "DuelingMLP", "ParameterVector"]


class DuelingHead(nn.Module):
    """``features -> V + A − mean A``: a value stream and an advantage stream (Wang et al. 2016,
    eq. 9), each a hidden layer and an output layer.

    Args:
        in_features: size of the shared features.
        act_dim: number of actions.
        hidden: units of each stream's hidden layer.
        activation: the hidden layers' activation class.
    """

    def __init__(self, in_features: int, act_dim: int, hidden: int,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(in_features, hidden), activation(),
                                   nn.Linear(hidden, 1))
        self.advantage = nn.Sequential(nn.Linear(in_features, hidden), activation(),
                                       nn.Linear(hidden, act_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        advantage = self.advantage(features)
        return self.value(features) + advantage - advantage.mean(-1, keepdim=True)


class NatureCNN(RLModule):
    """The Nature-DQN convolutional policy over stacked 84×84 frames.

    Args:
        obs_shape: ``(frames, height, width)`` of an observation (filled in from the env by
            recipes); uint8 pixels are scaled to ``[0, 1]``.
        act_dim: number of actions (logits) or action size (continuous mean).
        hidden: units of the fully connected layer (of each stream, with ``dueling``).
        dueling: a :class:`DuelingHead` over the convolutions' features instead of the
            fully connected layers (discrete actions).
    """

    def __init__(self, obs_shape: Sequence[int], act_dim: int, hidden: int = 512,
                 dueling: bool = False) -> None:
        super().__init__()
        channels, height, width = (int(s) for s in obs_shape)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(-3))
        with torch.no_grad():
            size = self.features(torch.zeros(1, channels, height, width)).shape[-1]
        self.head = (DuelingHead(size, act_dim, hidden) if dueling else
                     nn.Sequential(nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, act_dim)))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(observation.float() / 255.0))


class ConvNet(RLModule):
    """Convolutions (each keeping the image size, then average pooling) and a linear head.

    Args:
        obs_dim: flat input size (filled in from the env or dataset by recipes).
        act_dim: outputs (classes, or actions).
        image: ``(channels, height, width)`` of one input; their product must be ``obs_dim``.
        channels: output channels of each convolution.
        kernel: the convolutions' square kernel size (odd; zero padding keeps the size).
        pool: the average-pooling window (and stride) after each convolution; 1 for none.
        hidden: sizes of fully connected hidden layers after the convolutions.
        activation: ``"relu"``, ``"step"`` or ``"step_ste"`` (see :class:`unitrain.MLPPolicy`),
            after every convolution and hidden layer.
    """

    def __init__(self, obs_dim: int, act_dim: int, image: Sequence[int] = (1, 8, 8),
                 channels: Sequence[int] = (8, 16), kernel: int = 3, pool: int = 2,
                 hidden: Sequence[int] = (), activation: str = "relu") -> None:
        super().__init__()
        shape = tuple(int(s) for s in image)
        if len(shape) != 3 or shape[0] * shape[1] * shape[2] != obs_dim:
            raise ValueError(f"image {list(image)} must be [channels, height, width] with "
                             f"{obs_dim} values in all (the input size)")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {kernel}")
        if activation not in ("relu", "step", "step_ste"):
            raise ValueError(f"activation {activation!r} is not one of relu, step, step_ste")
        self.obs_dim = obs_dim
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = [nn.Unflatten(1, shape)]
        c_in, height, width = shape
        for c in channels:
            layers += [nn.Conv2d(c_in, int(c), kernel, padding=kernel // 2), act()]
            if pool > 1:
                layers.append(nn.AvgPool2d(pool))
                height, width = height // pool, width // pool
            c_in = int(c)
        layers.append(nn.Flatten())
        width_in = c_in * height * width
        for h in hidden:
            layers += [nn.Linear(width_in, int(h)), act()]
            width_in = int(h)
        layers.append(nn.Linear(width_in, act_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        lead = observation.shape[:-1]
        out = self.net(observation.reshape(-1, self.obs_dim).float())
        return out.reshape(*lead, out.shape[-1])


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.Tanh, out_gain: float | None = None) -> nn.Sequential:
    """A multilayer perceptron with orthogonal initialisation (√2 gain, output gain ``out_gain``).

    Args:
        in_dim: input features.
        out_dim: output features.
        hidden: sizes of the hidden layers.
        activation: activation class (or factory) between layers.
        out_gain: gain of the last layer's orthogonal init (``None`` keeps PyTorch's default).
    """
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b)
        nn.init.orthogonal_(lin.weight, math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers += [lin, activation()]
    last = nn.Linear(dims[-1], out_dim)
    if out_gain is not None:
        nn.init.orthogonal_(last.weight, out_gain)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "step": Step,
    "step_ste": functools.partial(Step, straight_through=True)}


class MLPPolicy(RLModule):
    """A multilayer-perceptron policy over flattened observations.

    A ``Dict`` (or ``Tuple``) observation of vectors is read by name (``forward(**entries)``)
    and concatenated in the order of ``obs_shapes`` (filled in from the env: gymnasium's
    ``Dict`` sorts its keys by name, a ``Tuple`` keeps its positions ``obs0``, ``obs1``, ...);
    each entry is flattened first.

    Args:
        obs_dim: flattened observation size (filled in from the env by recipes).
        act_dim: number of actions (discrete), of logits ``sum(nvec)`` (multi-discrete) or
            action size (continuous).
        hidden: hidden layer sizes; ``[]`` gives a linear policy.
        activation: ``"tanh"``, ``"relu"``, ``"gelu"``, ``"elu"``, ``"step"`` (the hard threshold
            :class:`unitrain.policy.nn.Step`, no gradient) or ``"step_ste"`` (the same with
            straight-through gradients).
        out_scale: gain of the output layer's init (small values start near-uniform/zero actions).
        obs_shape: observation shape; multi-dimensional observations are flattened.
        action_std: continuous actions: ``"param"`` (a learned state-independent log std) or
            ``"state"`` (the network also outputs the log std: ``2 * act_dim`` outputs).
        discrete: whether actions are discrete (filled in by recipes; discrete actions always
            take ``act_dim`` logits).
        obs_shapes: ``{name: shape}`` of a ``Dict``/``Tuple`` observation's entries, in the
            order they are concatenated (filled in by recipes); ``None`` for a Box observation.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", out_scale: float = 0.01,
                 obs_shape: Sequence[int] | None = None, action_std: str = "param",
                 discrete: bool | None = None,
                 obs_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        super().__init__()
        _check_options(activation, action_std)
        self.action_std = action_std
        self.obs_ndim = len(obs_shape) if obs_shape else 1
        self.obs_shapes = (None if obs_shapes is None else
                           {str(k): tuple(int(d) for d in s) for k, s in obs_shapes.items()})
        if self.obs_shapes is not None:
            total = sum(math.prod(s) for s in self.obs_shapes.values())
            if total != obs_dim:
                raise ValueError(f"obs_shapes {self.obs_shapes} hold {total} values; obs_dim is "
                                 f"{obs_dim}")
        outputs = 2 * act_dim if action_std == "state" and not discrete else act_dim
        self.net = mlp(obs_dim, outputs, tuple(hidden), ACTIVATIONS[activation], out_scale)

    def forward(self, observation: torch.Tensor | None = None,
                **entries: torch.Tensor) -> torch.Tensor:
        if self.obs_shapes is not None:
            missing = sorted(set(self.obs_shapes) - set(entries))
            if observation is not None or missing:
                raise TypeError(f"MLPPolicy takes the observation entries "
                                f"{list(self.obs_shapes)} by name; missing {missing}")
            return self.net(flat_observation(entries, self.obs_shapes))
        if observation is None or entries:
            raise TypeError(f"MLPPolicy was built for a Box observation (obs_shapes is None); "
                            f"got entries {sorted(entries)}")
        x = observation.flatten(-self.obs_ndim) if self.obs_ndim > 1 else observation
        return self.net(x.float())


def _check_options(activation: str, action_std: str) -> None:
    """Raise a ``ValueError`` naming the valid choices for an unknown option."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if action_std not in ACTION_STD:
        raise ValueError(f"action_std {action_std!r} is not one of {list(ACTION_STD)}")


class GRUPolicy(RLModule):
    """A recurrent policy: an MLP encoder, a GRU (:class:`unitrain.policy.nn.GRUCell`) and a
    linear head, with the state contract of :mod:`unitrain.policy.recurrent`.

    ``forward(observation [B, *obs_shape], h [B, hidden]) -> (output, h')``; the initial state
    is zeros.

    Args:
        obs_dim: flattened observation size (filled in from the env by recipes).
        act_dim: number of actions (discrete) or action size (continuous).
        encoder: hidden sizes of the encoder MLP before the GRU (``[]``: the observation goes
            into the GRU as it is).
        hidden: size of the GRU's state.
        activation: the encoder's activation (a name of :data:`ACTIVATIONS`).
        out_scale: gain of the head's orthogonal init.
        obs_shape: observation shape; multi-dimensional observations are flattened.
        action_std: continuous actions: ``"param"`` or ``"state"`` (as :class:`MLPPolicy`).
        discrete: whether actions are discrete (filled in by recipes).
    """

    def __init__(self, obs_dim: int, act_dim: int, encoder: Sequence[int] = (64,),
                 hidden: int = 64, activation: str = "tanh", out_scale: float = 0.01,
                 obs_shape: Sequence[int] | None = None, action_std: str = "param",
                 discrete: bool | None = None) -> None:
        super().__init__()
        _check_options(activation, action_std)
        self.action_std = action_std
        self.obs_ndim = len(obs_shape) if obs_shape else 1
        self.hidden_size = int(hidden)
        encoder = tuple(encoder)
        if encoder:
            # The encoder's last layer feeds the GRU through an activation too.
            self.encoder: nn.Module = nn.Sequential(
                *mlp(obs_dim, encoder[-1], encoder[:-1], ACTIVATIONS[activation], math.sqrt(2)),
                ACTIVATIONS[activation]())
        else:
            self.encoder = nn.Identity()
        self.gru = GRUCell(encoder[-1] if encoder else obs_dim, self.hidden_size)
        outputs = 2 * act_dim if action_std == "state" and not discrete else act_dim
        self.head = nn.Linear(self.hidden_size, outputs)
        nn.init.orthogonal_(self.head.weight, out_scale)
        nn.init.zeros_(self.head.bias)

    def initial_state(self, batch: int) -> torch.Tensor:
        """Zeros ``[batch, hidden]``."""
        return torch.zeros(batch, self.hidden_size, device=self.head.weight.device)

    def forward(self, observation: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = observation.flatten(-self.obs_ndim) if self.obs_ndim > 1 else observation
        h = self.gru(self.encoder(x.float()), state)
        return self.head(h), h


class DuelingMLP(RLModule):
    """A dueling network over flattened observations (Wang et al. 2016): an MLP trunk, then a
    :class:`DuelingHead` giving ``Q(s, a) = V(s) + A(s, a) − mean_a' A(s, a')``.

    Args:
        obs_dim: flattened observation size (filled in from the env by recipes).
        act_dim: number of actions (filled in from the env by recipes).
        hidden: hidden layer sizes of the shared trunk (``[]``: the streams read the
            observation itself).
        stream_hidden: units of the hidden layer of each stream.
        activation: ``"tanh"``, ``"relu"``, ``"gelu"`` or ``"elu"``.
        obs_shape: observation shape; multi-dimensional observations are flattened.
        discrete: must not be ``False`` (filled in by recipes): the output is one value per
            discrete action.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64,),
                 stream_hidden: int = 64, activation: str = "relu",
                 obs_shape: Sequence[int] | None = None, discrete: bool | None = None) -> None:
        super().__init__()
        if activation not in ("tanh", "relu", "gelu", "elu"):
            raise ValueError(f"activation {activation!r} is not one of elu, gelu, relu, tanh")
        if discrete is False:
            raise ValueError("a dueling network gives one value per discrete action; this env's "
                             "actions are continuous")
        self.obs_ndim = len(obs_shape) if obs_shape else 1
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), act()]
            width = int(h)
        self.trunk = nn.Sequential(*layers)
        self.head = DuelingHead(width, act_dim, stream_hidden, act)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        x = observation.flatten(-self.obs_ndim) if self.obs_ndim > 1 else observation
        return self.head(self.trunk(x.float()))


class ParameterVector(RLModule):
    """A module whose action is its parameter vector ``x`` (for :class:`FunctionEnv`).

    Args:
        act_dim: the dimension of ``x`` (filled in from the env by recipes).
        init: the starting point: one number for every coordinate, or ``act_dim`` numbers.
    """

    def __init__(self, act_dim: int, init: float | Sequence[float] = 0.0) -> None:
        super().__init__()
        start = torch.as_tensor(init, dtype=torch.float32).expand(act_dim).clone()
        self.x = nn.Parameter(start)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.x.expand(*observation.shape[:-1], -1)
