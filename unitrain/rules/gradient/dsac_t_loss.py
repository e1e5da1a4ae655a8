r"""DSAC-T: Distributional Soft Actor-Critic with Three Refinements, as a TorchRL loss.

Reference: J. Duan et al., "Distributional Soft Actor-Critic with Three Refinements"
(DSAC-T, also released as DSAC-v2), arXiv:2310.05858.

Each of the twin critics models the soft return of ``(s, a)`` as a Gaussian with mean
:math:`Q_i(s, a)` and standard deviation :math:`\sigma_i(s, a) = \mathrm{softplus}(\rho_i) +
\sigma_{\min}`, where :math:`\rho_i` is the critic's raw second output. The policy is a
tanh-squashed Gaussian whose actions lie in :math:`[-1, 1]`. Equations, numbered for reference
from the code (``sg`` is stop-gradient, :math:`d` is the *terminated* flag, :math:`\varepsilon =
0.1`):

(1) Target sample. :math:`a' \sim \pi_{\bar\phi}(\cdot|s')` from the *target* policy;
    :math:`j = \arg\min_i \bar Q_i(s', a')`; :math:`Q' = \bar Q_j(s', a')`,
    :math:`Z' = Q' + \mathrm{clamp}(\xi, -3, 3)\,\bar\sigma_j(s', a')`, :math:`\xi \sim N(0, 1)`.

(2) Expected value substitution. :math:`y_q = r + \gamma(1-d)(Q' - \alpha \log\pi(a'|s'))`
    drives the mean; :math:`y_z = r + \gamma(1-d)(Z' - \alpha \log\pi(a'|s'))` drives the
    variance.

(3) Moving average of the critic's spread, per critic, updated *before* it is used:
    :math:`\omega_i \leftarrow (1-\tau_b)\,\omega_i + \tau_b\,\mathrm{mean}_{batch}(\sigma_i)`
    (the first batch initialises :math:`\omega_i` to its mean).

(4) Target clipping. :math:`y_{b,i} = Q_i + \mathrm{clamp}(y_z - Q_i, -b_i, b_i)`,
    :math:`b_i = 3\omega_i`.

(5) Critic loss (the paper's form), summed over the twin critics:

    .. math::
        L_i = (\omega_i^2 + \varepsilon)\;\mathrm{mean}\Big[
        -\frac{\mathrm{sg}(y_q - Q_i)}{\mathrm{sg}(\sigma_i)^2 + \varepsilon}\,Q_i
        -\frac{(\mathrm{sg}(Q_i) - y_{b,i})^2 - \mathrm{sg}(\sigma_i)^2}
              {\mathrm{sg}(\sigma_i)^3 + \varepsilon}\,\sigma_i \Big]

    so :math:`\partial L_i/\partial Q_i \propto -(\omega_i^2+\varepsilon)(y_q - Q_i)/(\sigma_i^2
    + \varepsilon)` and :math:`\partial L_i/\partial\sigma_i \propto -(\omega_i^2+\varepsilon)
    ((Q_i - y_{b,i})^2 - \sigma_i^2)/(\sigma_i^3 + \varepsilon)`: the variance-based
    gradient adjustment of the Gaussian log-likelihood.

(6) Actor loss. :math:`\mathrm{mean}[\alpha \log\pi(\tilde a|s) - \min_i Q_i(s, \tilde a)]`,
    :math:`\tilde a` reparameterised from the current policy.

(7) Temperature loss. :math:`-\log\alpha \cdot \mathrm{mean}[\log\pi(\tilde a|s) + \bar H]`,
    target entropy :math:`\bar H = -|A|` by default.

Critic loss variant: this module implements the paper's form (5), not the variant of the
authors' later code (squared errors replaced by a Huber loss with :math:`\delta = 50`, the loss
weighted by :math:`\mathrm{clamp}(\omega^2/(\sigma^2 + 0.1), 0.1, 10)`). Form (5) is the one
the paper states and derives, and each of its two gradient terms has a closed form that the
tests check by hand; the later variant is a code-level change without a published derivation.
For TD errors below 50 and unclamped weights its mean-gradient equals that of (5) up to the
:math:`\varepsilon` in the numerator; its additions bound per-sample weights and gradients, a
safeguard for very large returns that this module leaves to reward scaling.

Policy: the actor maps an observation to ``(loc, raw_scale)``; the scale is
``exp(clamp(raw_scale, *log_std_bounds))`` with the default bounds ``(-20, 0.5)`` of the authors'
MuJoCo configuration, and the action is ``tanh(loc + scale * noise)``. Actions are in
``[-1, 1]``: the caller scales them to the environment's bounds (and stores the *unscaled*
action in the replay data this loss reads).

Temperature: :math:`\log\alpha` is a parameter initialised to ``log(alpha_init)``; the default
``alpha_init = e`` (:math:`\log\alpha = 1`) follows the authors' released code.

Delayed updates: the paper updates the critics every iteration and the policy, the temperature
and the target networks (Polyak :math:`\tau = 0.005`) every second iteration. The loss keeps no
iteration counter; the caller chooses one of two equivalent drives:

- call :meth:`DSACTLoss.forward` every iteration, zero all gradients, back-propagate the sum of
  the ``loss_*`` entries (the three losses touch disjoint parameters), step the critic optimiser,
  and on delayed iterations also step the actor and temperature optimisers and a
  :class:`~torchrl.objectives.SoftUpdate` built on this loss (as in the authors' code, all three
  gradients are then taken at the same parameters);
- or call :meth:`~DSACTLoss.critic_loss` every iteration and :meth:`~DSACTLoss.actor_loss` and
  :meth:`~DSACTLoss.alpha_loss` only on delayed iterations, which skips their computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModuleBase, dispatch
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.modules.distributions.utils import rsample_and_log_prob
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import ValueEstimators, dispatch_value_estimator

__all__ = ["DSACTLoss", "DSACTActor", "DSACTCritic", "make_dsac_t_networks"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


def _mlp(in_dim: int, out_dim: int, hidden: Sequence[int],
         activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), activation()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class _GaussianHead(nn.Module):
    """An MLP ``self.net`` whose output halves are the two parameters of a Gaussian: over the
    observation for the policy, over the observation and the action for a critic.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: widths of the hidden layers.
        activation: hidden activation class.
    """

    reads_action: ClassVar[bool] = False

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256, 256),
                 activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        if self.reads_action:
            self.net = _mlp(obs_dim + act_dim, 2, hidden, activation)
        else:
            self.net = _mlp(obs_dim, 2 * act_dim, hidden, activation)


class DSACTActor(_GaussianHead):
    """A Gaussian policy head: observation -> ``(loc, raw_scale)``, each ``[..., act_dim]``;
    an MLP of ``hidden`` widths and ``activation`` over ``obs_dim`` inputs.
    """

    def forward(self, observation: Tensor) -> tuple[Tensor, Tensor]:
        """The pre-tanh Gaussian's parameters.

        Args:
            observation: ``[..., obs_dim]``.

        Returns:
            ``(loc, raw_scale)``; the loss maps ``raw_scale`` (a log standard deviation) to a scale.
        """
        loc, raw_scale = self.net(observation).chunk(2, dim=-1)
        return loc, raw_scale


class DSACTCritic(_GaussianHead):
    """A Gaussian return head: ``(observation, action)`` -> ``(mean, raw_std)``, each ``[..., 1]``;
    an MLP of ``hidden`` widths and ``activation`` over ``obs_dim + act_dim`` inputs.
    """

    reads_action = True

    def forward(self, observation: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """The return distribution's parameters.

        Args:
            observation: ``[..., obs_dim]``.
            action: ``[..., act_dim]``, in ``[-1, 1]``.

        Returns:
            ``(mean, raw_std)``; the loss maps ``raw_std`` to a standard deviation.
        """
        mean, raw_std = self.net(torch.cat([observation, action], dim=-1)).chunk(2, dim=-1)
        return mean, raw_std


def make_dsac_t_networks(
    obs_dim: int,
    act_dim: int,
    hidden: Sequence[int] = (256, 256, 256),
    activation: type[nn.Module] = nn.GELU,
) -> tuple[DSACTActor, list[DSACTCritic]]:
    """The paper's networks: an actor and twin critics, each an MLP with 3x256 GELU layers.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: widths of the hidden layers.
        activation: hidden activation class.

    Returns:
        ``(actor, [critic_1, critic_2])``, ready for ``DSACTLoss(actor, critics)``.
    """
    actor = DSACTActor(obs_dim, act_dim, hidden, activation)
    critics = [DSACTCritic(obs_dim, act_dim, hidden, activation) for _ in range(2)]
    return actor, critics


class DSACTLoss(LossModule):
    """The DSAC-T losses (critic, actor, temperature) over a batch of transitions.

    Equations (1)-(7), the critic-loss variant and the delayed-update protocol are described in
    the module docstring. Target networks for the actor and the critics are created here and
    updated by a :class:`~torchrl.objectives.SoftUpdate` built on this loss.

    Args:
        actor_network: either an ``nn.Module`` mapping an observation to ``(loc, raw_scale)``
            (e.g. :class:`DSACTActor`), or a TorchRL probabilistic actor (a
            :class:`~tensordict.nn.TensorDictModuleBase` with ``get_dist``) whose distribution is
            a tanh-Gaussian on ``[-1, 1]``, such as a ``ProbabilisticActor`` with ``TanhNormal``.
            Its parameters are trained in place.
        qvalue_network: the twin critics, each an ``nn.Module`` mapping ``(observation,
            action)`` to ``(mean, raw_std)``; either a sequence of distinct modules or a
            zero-argument factory called ``num_qvalue_nets`` times. The loss owns a stacked copy
            of their parameters (``qvalue_network_params``), initialised from them.

    Keyword Args:
        num_qvalue_nets: critics built by a factory (ignored for a sequence). Default 2.
        gamma: discount of the default TD(0) value estimator. Default 0.99.
        alpha_init: initial temperature. Default ``e``.
        target_entropy: target policy entropy; ``"auto"`` means ``-action_dim``, the action size
            being read from the policy's samples.
        tau_b: step of the moving average omega, eq. (3). Default 0.005 (the Polyak tau).
        clip_multiplier: ``b = clip_multiplier * omega`` in eq. (4). Default 3.
        xi_clip: clamp of the standard-normal draw in eq. (1). Default 3.
        epsilon: the bias in eq. (5). Default 0.1.
        critic_min_std: added to ``softplus(raw_std)``. Default 1e-4.
        log_std_bounds: clamp of the plain actor's ``raw_scale`` (a log standard deviation).
            Default ``(-20, 0.5)``.
        reduction: ``"mean"`` (the paper), ``"sum"`` or ``"none"`` over the batch.
        use_prioritized_weights: weight the losses by the ``priority_weight`` entry when present
            (``"auto"``), always (``True``) or never (``False``).

    Input entries (names configurable with :meth:`set_keys`): ``observation``, ``action``,
    ``("next", "observation")``, ``("next", "reward")``, ``("next", "done")``,
    ``("next", "terminated")``; rewards and flags are ``[*batch, 1]``.

    Optimisers: the critic parameters are ``qvalue_network_params.values(True, True)``, the
    actor's ``actor_network_params.values(True, True)`` (the actor module's own parameters)
    and the temperature's ``[log_alpha]``; target parameters are buffers.

    Randomness: :meth:`critic_loss` draws the target-policy noise and then ``xi`` (one per
    transition); :meth:`actor_loss` draws the policy noise; :meth:`forward` runs them in that
    order. While the module is in training mode, :meth:`critic_loss` updates ``omega``.
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read and written by the loss (set with ``set_keys``).

        Attributes:
            observation: observation read by the critics and by a plain actor.
            action: the stored action, in ``[-1, 1]``.
            reward: reward, under ``"next"``.
            done: done flag, under ``"next"``.
            terminated: termination flag, under ``"next"``; it stops bootstrapping.
            priority: where the TD error is written for prioritised replay.
            priority_weight: importance weights read for prioritised replay.
            value: the name the value estimator gives the next soft state value.
        """

        observation: NestedKey = "observation"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        priority: NestedKey = "td_error"
        priority_weight: NestedKey = "priority_weight"
        value: NestedKey = "state_value"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0,)

    actor_network: nn.Module
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    qvalue_network: nn.Module
    qvalue_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams
    log_alpha: nn.Parameter
    omega: Tensor
    omega_initialized: Tensor

    out_keys = ["loss_qvalue", "loss_actor", "loss_alpha", "alpha", "entropy", "omega",
                "pred_value", "pred_std", "target_value"]

    def __init__(
        self,
        actor_network: nn.Module,
        qvalue_network: Sequence[nn.Module] | Callable[[], nn.Module],
        *,
        num_qvalue_nets: int = 2,
        gamma: float = 0.99,
        alpha_init: float = math.e,
        target_entropy: float | Literal["auto"] = "auto",
        tau_b: float = 0.005,
        clip_multiplier: float = 3.0,
        xi_clip: float = 3.0,
        epsilon: float = 0.1,
        critic_min_std: float = 1e-4,
        log_std_bounds: tuple[float, float] = (-20.0, 0.5),
        reduction: Literal["mean", "sum", "none"] = "mean",
        use_prioritized_weights: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        critics = self._build_critics(qvalue_network, num_qvalue_nets)
        self.num_qvalue_nets = len(critics)
        self._actor_is_tensordict = isinstance(actor_network, TensorDictModuleBase)
        if self._actor_is_tensordict and not hasattr(actor_network, "get_dist"):
            raise TypeError("A TensorDict actor must be probabilistic (have `get_dist`), "
                            "e.g. a ProbabilisticActor with a TanhNormal distribution.")
        if not 0.0 < tau_b <= 1.0:
            raise ValueError(f"tau_b must be in (0, 1], got {tau_b}.")
        if log_std_bounds[0] > log_std_bounds[1]:
            raise ValueError(f"log_std_bounds must be (low, high) with low <= high, "
                             f"got {log_std_bounds}.")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")

        self.convert_to_functional(actor_network, "actor_network", create_target_params=True)
        self.convert_to_functional(critics, "qvalue_network", self.num_qvalue_nets,
                                   create_target_params=True)
        device = next(iter(self.actor_network_params.values(True, True))).device

        self.register_parameter("log_alpha",
                                nn.Parameter(torch.tensor(math.log(alpha_init), device=device)))
        self.register_buffer("omega", torch.zeros(self.num_qvalue_nets, device=device))
        self.register_buffer("omega_initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.target_entropy = None if target_entropy == "auto" else float(target_entropy)
        self._action_dim: int | None = None

        self.tau_b = float(tau_b)
        self.clip_multiplier = float(clip_multiplier)
        self.xi_clip = float(xi_clip)
        self.epsilon = float(epsilon)
        self.critic_min_std = float(critic_min_std)
        self.log_std_bounds = (float(log_std_bounds[0]), float(log_std_bounds[1]))
        self.reduction = reduction
        self.use_prioritized_weights = use_prioritized_weights
        self._in_keys: list[NestedKey] | None = None
        self.make_value_estimator(ValueEstimators.TD0, gamma=gamma)

    @staticmethod
    def _build_critics(qvalue_network: Sequence[nn.Module] | Callable[[], nn.Module],
                       num_qvalue_nets: int) -> list[nn.Module]:
        if isinstance(qvalue_network, nn.Module):
            raise TypeError("Pass the twin critics as a sequence of distinct modules or as a "
                            "zero-argument factory, not as a single module.")
        if callable(qvalue_network):
            critics = [qvalue_network() for _ in range(num_qvalue_nets)]
        else:
            critics = list(qvalue_network)
        if len(critics) < 1 or not all(isinstance(c, nn.Module) for c in critics):
            raise TypeError("The critics must be nn.Module instances.")
        if len({id(c) for c in critics}) != len(critics):
            raise ValueError("The critics must be distinct modules: a repeated one stays tied.")
        return critics

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(value=self.tensor_keys.value,
                                           reward=self.tensor_keys.reward,
                                           done=self.tensor_keys.done,
                                           terminated=self.tensor_keys.terminated)
        self._in_keys = None

    def make_value_estimator(self, value_type: ValueEstimators | None = None,
                             **hyperparams) -> DSACTLoss:
        """Build the value estimator (TD(0) only: targets (2) are one-step bootstraps).

        Args:
            value_type: ``ValueEstimators.TD0`` (default), or an estimator instance/class.
            **hyperparams: estimator arguments, e.g. ``gamma``.

        Returns:
            This loss.
        """
        value_type, hp = self._prepare_value_estimator_kwargs(value_type, **hyperparams)
        if value_type is None:
            return self
        dispatch_value_estimator(
            self, value_type, supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys={"value": self.tensor_keys.value, "reward": self.tensor_keys.reward,
                         "done": self.tensor_keys.done, "terminated": self.tensor_keys.terminated},
            value_network=None, **hp)
        return self

    @property
    def in_keys(self) -> list[NestedKey]:
        """The input entries :meth:`forward` reads."""
        if self._in_keys is None:
            keys = self.tensor_keys
            actor_keys = (list(self.actor_network.in_keys) if self._actor_is_tensordict
                          else [keys.observation])
            wanted = [keys.observation, keys.action, ("next", keys.observation),
                      ("next", keys.reward), ("next", keys.done), ("next", keys.terminated),
                      *actor_keys, *[("next", k) for k in actor_keys]]
            self._in_keys = list(dict.fromkeys(wanted))
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values: list[NestedKey]) -> None:
        self._in_keys = values

    @property
    def alpha(self) -> Tensor:
        """The current temperature (detached)."""
        return self.log_alpha.detach().exp()

    def _sample_action(self, tensordict: TensorDictBase,
                       params: TensorDictBase) -> tuple[Tensor, Tensor]:
        """A reparameterised tanh-Gaussian action and its log-density under ``params``."""
        if self._actor_is_tensordict:
            actor_input = tensordict.select(*self.actor_network.in_keys, strict=False)
            with params.to_module(self.actor_network, preserve_module_state=False):
                dist = self.actor_network.get_dist(actor_input)
            action, log_prob = rsample_and_log_prob(dist)
        else:
            with params.to_module(self.actor_network, preserve_module_state=False):
                loc, raw_scale = self.actor_network(tensordict.get(self.tensor_keys.observation))
            log_std = raw_scale.clamp(*self.log_std_bounds)
            noise = torch.randn_like(loc)
            pre_tanh = loc + log_std.exp() * noise
            action = torch.tanh(pre_tanh)
            # Gaussian log-density at pre_tanh, minus log|d tanh/du| = log(1 - tanh(u)^2),
            # written as 2 (log 2 - u - softplus(-2u)) to stay finite when tanh saturates.
            log_prob = (-0.5 * noise.pow(2) - log_std - _LOG_SQRT_2PI
                        - 2.0 * (_LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
        self._action_dim = action.shape[-1]
        return action, log_prob

    def _critics(self, params: TensorDictBase, observation: Tensor, action: Tensor,
                 batch_size: torch.Size) -> tuple[Tensor, Tensor]:
        """Means and standard deviations of every critic, each ``[num_qvalue_nets, *batch]``."""
        def one_critic(critic_params: TensorDictBase, obs: Tensor,
                       act: Tensor) -> tuple[Tensor, Tensor]:
            with critic_params.to_module(self.qvalue_network, preserve_module_state=False):
                return self.qvalue_network(obs, act)

        all_critics = torch.vmap(one_critic, (0, None, None), randomness=self.vmap_randomness)
        mean, raw_std = all_critics(params, observation, action)
        shape = (self.num_qvalue_nets, *batch_size)
        return mean.reshape(shape), F.softplus(raw_std.reshape(shape)) + self.critic_min_std

    def _bootstrap(self, tensordict: TensorDictBase, next_value: Tensor) -> Tensor:
        """``r + gamma (1 - terminated) next_value`` from the value estimator, ``[*batch]``."""
        reward = tensordict.get(("next", self.tensor_keys.reward))
        target = self.value_estimator.value_estimate(
            tensordict, next_value=next_value.reshape(reward.shape))
        return target.reshape(tensordict.batch_size)

    @torch.no_grad()
    def _update_omega(self, std: Tensor) -> Tensor:
        """Eq. (3); returns the omega to use for this batch, ``[num_qvalue_nets]``."""
        if self.training:
            batch_mean = std.reshape(self.num_qvalue_nets, -1).mean(-1)
            moved = torch.lerp(self.omega, batch_mean, self.tau_b)
            # The first batch seeds omega with its own mean instead of averaging against zero.
            self.omega.copy_(torch.where(self.omega_initialized, moved, batch_mean))
            self.omega_initialized.fill_(True)
        return self.omega.clone()

    def critic_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """Eqs. (1)-(5): the twin distributional critics' loss; updates omega in training mode.

        Args:
            tensordict: a batch of transitions.

        Returns:
            ``(loss, metadata)``; the loss is reduced per ``reduction`` and summed over critics.
            Metadata (detached): ``pred_value``/``pred_std`` (``[num_qvalue_nets, *batch]``),
            ``target_value`` (y_q), ``target_sample`` (y_z), ``target_sample_clipped`` (y_b,
            ``[num_qvalue_nets, *batch]``), ``omega`` and ``td_error`` (``[*batch]``).
        """
        batch_size = tensordict.batch_size
        weights = self._maybe_get_priority_weight(tensordict)
        next_td = tensordict.get("next")
        with torch.no_grad():
            next_action, next_log_prob = self._sample_action(
                next_td, self.target_actor_network_params)
            next_mean, next_std = self._critics(self.target_qvalue_network_params,
                                                next_td.get(self.tensor_keys.observation),
                                                next_action, batch_size)
            # Eq. (1): the smaller-mean target critic supplies both Q' and the sample Z'.
            chosen = next_mean.argmin(0, keepdim=True)
            next_q = next_mean.gather(0, chosen).squeeze(0)
            next_sigma = next_std.gather(0, chosen).squeeze(0)
            xi = torch.randn_like(next_q).clamp(-self.xi_clip, self.xi_clip)
            next_z = next_q + xi * next_sigma
            entropy_bonus = self.alpha * next_log_prob
            # Eq. (2): the mean is learnt from the expected target, the spread from the sample.
            target_q = self._bootstrap(tensordict, next_q - entropy_bonus)
            target_z = self._bootstrap(tensordict, next_z - entropy_bonus)

        mean, std = self._critics(self.qvalue_network_params,
                                  tensordict.get(self.tensor_keys.observation),
                                  tensordict.get(self.tensor_keys.action), batch_size)
        omega = self._update_omega(std).reshape(self.num_qvalue_nets, *([1] * len(batch_size)))
        mean_sg, std_sg = mean.detach(), std.detach()
        # Eq. (4): the sampled target may not stray further than b = 3 omega from Q.
        bound = self.clip_multiplier * omega
        target_b = mean_sg + torch.maximum(torch.minimum(target_z - mean_sg, bound), -bound)
        eps = self.epsilon
        # Eq. (5): stop-gradient coefficients times Q and sigma give the adjusted gradients.
        mean_term = -(target_q - mean_sg) / (std_sg.pow(2) + eps) * mean
        std_term = -((mean_sg - target_b).pow(2) - std_sg.pow(2)) / (std_sg.pow(3) + eps) * std
        per_sample = ((omega.pow(2) + eps) * (mean_term + std_term)).sum(0)
        loss = self._reduce_loss(per_sample, tensordict, weights=weights)
        metadata = {
            "pred_value": mean_sg,
            "pred_std": std_sg,
            "target_value": target_q,
            "target_sample": target_z,
            "target_sample_clipped": target_b,
            "omega": omega.reshape(-1),
            "td_error": (target_q - mean_sg).abs().amax(0),
        }
        return loss, metadata

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. (6): the policy loss; the critics' parameters receive no gradient.

        Args:
            tensordict: a batch of transitions (only observations are read).

        Returns:
            ``(loss, metadata)`` with ``log_prob`` (``[*batch]``) and ``entropy`` (scalar),
            detached; pass ``metadata["log_prob"]`` to :meth:`alpha_loss`.
        """
        weights = self._maybe_get_priority_weight(tensordict)
        action, log_prob = self._sample_action(tensordict, self.actor_network_params)
        mean, _ = self._critics(self.qvalue_network_params.detach(),
                                tensordict.get(self.tensor_keys.observation), action,
                                tensordict.batch_size)
        per_sample = self.alpha * log_prob - mean.amin(0)
        loss = self._reduce_loss(per_sample, tensordict, weights=weights)
        log_prob = log_prob.detach()
        return loss, {"log_prob": log_prob, "entropy": -log_prob.mean()}

    def alpha_loss(self, log_prob: Tensor) -> Tensor:
        """Eq. (7): the temperature loss; its gradient reaches ``log_alpha`` only.

        Args:
            log_prob: log-densities of fresh policy samples (``actor_loss`` metadata).

        Returns:
            The loss, reduced per ``reduction``.
        """
        target_entropy = self.target_entropy
        if target_entropy is None:
            if self._action_dim is None:
                raise RuntimeError("target_entropy='auto' needs the action size: call actor_loss "
                                   "first or pass target_entropy to the constructor.")
            target_entropy = -float(self._action_dim)
        per_sample = -self.log_alpha * (log_prob.detach() + target_entropy)
        return self._reduce_loss(per_sample)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """All three losses at the current parameters, plus logged scalars.

        Writes the TD error to the input's ``priority`` entry.

        Args:
            tensordict: a batch of transitions.

        Returns:
            A TensorDict with ``loss_qvalue``, ``loss_actor``, ``loss_alpha`` and the detached
            scalars ``alpha``, ``entropy``, ``omega`` (mean over critics), ``pred_value``,
            ``pred_std`` and ``target_value`` (batch means).
        """
        loss_qvalue, critic_info = self.critic_loss(tensordict)
        loss_actor, actor_info = self.actor_loss(tensordict)
        loss_alpha = self.alpha_loss(actor_info["log_prob"])
        tensordict.set(self.tensor_keys.priority, critic_info["td_error"])
        return TensorDict(
            {
                "loss_qvalue": loss_qvalue,
                "loss_actor": loss_actor,
                "loss_alpha": loss_alpha,
                "alpha": self.alpha,
                "entropy": actor_info["entropy"],
                "omega": critic_info["omega"].mean(),
                "pred_value": critic_info["pred_value"].mean(),
                "pred_std": critic_info["pred_std"].mean(),
                "target_value": critic_info["target_value"].mean(),
            },
            batch_size=[],
        )
