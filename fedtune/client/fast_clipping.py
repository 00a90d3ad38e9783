"""Ghost clipping for DP-SGD: clipped, noised gradient sums in one backward pass, mostly without per-sample gradients.

The "ghost norm + book-keeping" technique (Li et al. 2022, "Large language models can be strong
differentially private learners"; Bu et al. 2023, "Differentially private optimization on large
model at small cost"). A forward hook keeps each trainable layer's input a; one backward pass of
the summed loss gives its output gradient g, whose row i is example i's own. Then, per layer:

- nn.Linear, and nn.Conv2d with a 1x1 kernel, one group and no padding (a Linear over spatial
  positions, strided by subsampling the input): example i's weight gradient is g_i^T a_i, whose
  squared norm is |a_i|^2 |g_i|^2 for one position, sum_{t,t'} (a_t.a_t')(g_t.g_t') for T of
  them (or the materialised g_i^T a_i where that is smaller than the two T x T Gram matrices);
- ChannelAffine (BatchNorm's trainable part here): per-example gradients are per-channel sums,
  as small as the parameters, so they are materialised;
- any other layer type with a grad sampler in Opacus's public registry
  (opacus.grad_sample.GradSampleModule.GRAD_SAMPLERS, extended by register_grad_sampler):
  that layer's per-sample gradients, from Opacus's own function.

The clipping factors c_i = min(1, C / (norm_i + 1e-6)) are Opacus 1.6's own
(opacus/optimizers/optimizer.py, DPOptimizer.clip_and_accumulate), and each parameter's clipped
sum is one matmul, (c * g)^T a: no second backward pass. Gaussian noise of std
noise_multiplier * C is added and the sum divided by the expected batch size, as DPOptimizer does
for loss_reduction "mean" (add_noise, scale_grad); the caller's optimizer then steps. A layer
that runs twice in one forward pass, or whose output is changed in place, is refused: these
rules would compute something else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

log = logging.getLogger("fedtune.client")

# How Opacus keeps a clipping factor finite when a per-sample gradient is zero (clip_and_accumulate).
_OPACUS_NORM_EPSILON = 1e-6


class ChannelAffine(nn.Module):
    """BatchNorm's affine part, y = weight * x + bias per channel: the only part with Parameters."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class UnsupportedLayer(ValueError):
    """A trainable layer that ghost clipping cannot clip (per-sample gradients must then come from Opacus)."""


def _grad_samplers() -> dict[type, Callable[..., dict[Tensor, Tensor]]]:
    from opacus.grad_sample import GradSampleModule  # Opacus is imported only by DP-SGD rounds

    return GradSampleModule.GRAD_SAMPLERS


def _is_pointwise_conv(module: nn.Module) -> bool:
    """A Conv2d that is a Linear over (strided) positions: 1x1 kernel, one group, no padding."""
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1
            and module.padding in ((0, 0), "valid"))


def _rule_for(module: nn.Module) -> str | None:
    # Exact types, as Opacus matches them: a subclass may compute something else in forward().
    if type(module) is nn.Linear or _is_pointwise_conv(module):
        return "ghost"
    if type(module) is ChannelAffine:
        return "channel"
    if type(module) in _grad_samplers():
        return "sampler"
    return None


def _trainable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, layer) for name, layer in module.named_modules()
            if any(p.requires_grad for p in layer.parameters(recurse=False))]


def unsupported_layers(module: nn.Module) -> list[str]:
    """The trainable layers of `module` that ghost clipping cannot clip, each as 'name (Type)'."""
    return [f"{name or '<root>'} ({type(layer).__name__})" for name, layer in _trainable_layers(module)
            if _rule_for(layer) is None]


class _Tape:
    """One trainable layer: what its forward pass took in and gave out, and its per-sample view."""

    __slots__ = ("name", "layer", "rule", "params", "weight", "bias", "activation", "output", "output_version",
                 "backprop", "per_sample")

    def __init__(self, name: str, layer: nn.Module, rule: str) -> None:
        self.name, self.layer, self.rule = name or "<root>", layer, rule
        self.params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        # The trainable weight and bias of a 'ghost' or 'channel' layer (None when frozen or absent).
        self.weight, self.bias = (self._trainable(getattr(layer, attribute, None))
                                    for attribute in ("weight", "bias"))
        self.output_version = 0
        self.clear()

    @staticmethod
    def _trainable(param: object) -> Tensor | None:
        return param if isinstance(param, Tensor) and param.requires_grad else None

    def clear(self) -> None:
        self.activation: Tensor | None = None
        self.output: Tensor | None = None
        self.backprop: Tensor | None = None  # the summed loss's gradient w.r.t. the output: per-sample rows
        self.per_sample: dict[Tensor, Tensor] = {}  # 'channel' and 'sampler' rules


def _as_sequence(tape: _Tape) -> tuple[Tensor, Tensor]:
    """(a, g) of a 'ghost' layer as (batch, positions, features)."""
    a, g = tape.activation, tape.backprop
    assert a is not None and g is not None
    if isinstance(tape.layer, nn.Conv2d):
        stride_h, stride_w = tape.layer.stride
        a = a[:, :, ::stride_h, ::stride_w]  # a 1x1 kernel at stride s sees every s-th position
        return a.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2)
    return a.reshape(len(a), -1, a.shape[-1]), g.reshape(len(g), -1, g.shape[-1])


def _ghost_squared_norms(tape: _Tape) -> Tensor:
    weight, bias = tape.weight, tape.bias
    a, g = tape.activation, tape.backprop
    assert a is not None and g is not None
    if a.dim() == 2:  # one position (a Linear on pooled features): the common case, kept lean
        g_squared = torch.linalg.vector_norm(g, dim=1).square()
        squared = torch.linalg.vector_norm(a, dim=1).square() * g_squared if weight is not None else None
        if bias is not None:
            squared = g_squared if squared is None else squared + g_squared
        assert squared is not None  # the layer has a trainable parameter
        return squared
    a, g = _as_sequence(tape)
    positions, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    squared = torch.zeros(len(a), dtype=g.dtype, device=g.device)
    if weight is not None:
        if positions * positions <= d_in * d_out:
            # The two Gram matrices are smaller than each example's gradient: never build the latter.
            squared = squared + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        else:
            squared = squared + torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    if bias is not None:
        squared = squared + g.sum(1).square().sum(1)
    return squared


def _ghost_clipped_sums(tape: _Tape, factors: Tensor) -> dict[Tensor, Tensor]:
    """Book-keeping: sum_i c_i g_i^T a_i as one matmul of the clipped output gradients and the inputs."""
    if tape.activation is not None and tape.backprop is not None and tape.activation.dim() == 2:
        a, scaled = tape.activation, tape.backprop * factors.unsqueeze(1)
    else:
        a, g = _as_sequence(tape)
        a, scaled = a.reshape(-1, a.shape[2]), (g * factors.view(-1, 1, 1)).reshape(-1, g.shape[2])
    sums: dict[Tensor, Tensor] = {}
    if tape.weight is not None:
        sums[tape.weight] = (scaled.T @ a).view_as(tape.weight)
    if tape.bias is not None:
        sums[tape.bias] = scaled.sum(0)
    return sums


def _channel_per_sample(tape: _Tape) -> dict[Tensor, Tensor]:
    """ChannelAffine's per-sample gradients, (batch, channels) each: sums of g * x and of g over positions."""
    x, g = tape.activation, tape.backprop
    assert x is not None and g is not None
    per_sample = {}
    if tape.weight is not None:
        per_sample[tape.weight] = (g * x).reshape(len(g), g.shape[1], -1).sum(2)
    if tape.bias is not None:
        per_sample[tape.bias] = g.reshape(len(g), g.shape[1], -1).sum(2)
    return per_sample


class GhostClipping:
    """Hooks on a module's trainable layers that turn one backward pass into DP-SGD's noised gradients.

    Use as a context manager (the hooks are removed on exit), then per batch:
    `clipped_noised_gradients(loss_sum, batch_size=...)` after the forward pass, or `noise_only_gradients()` for an
    empty batch, then the optimizer's step(). Raises UnsupportedLayer when a trainable layer has
    no rule here and no grad sampler in Opacus's registry.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, noise_multiplier: float,
                 expected_batch_size: int, generator: torch.Generator | None = None) -> None:
        unsupported = unsupported_layers(module)
        if unsupported:  # (one walk more, over the trainable layers only: cheap)
            raise UnsupportedLayer(f"ghost clipping has no rule for {', '.join(unsupported)}")
        if expected_batch_size < 1:
            raise ValueError(f"expected_batch_size must be at least 1, not {expected_batch_size}")
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.non_finite_examples = 0  # examples whose gradient norm was NaN or infinite, left out of the sums
        self._tapes = [_Tape(name, layer, rule) for name, layer in _trainable_layers(module)
                       if (rule := _rule_for(layer)) is not None]
        self._handles: list[RemovableHandle] = []
        log.debug("ghost clipping: %s", self.rules)

    @property
    def rules(self) -> dict[str, str]:
        """How each trainable layer is clipped: 'ghost' (its norms without per-sample gradients),
        'channel' (per-channel per-sample gradients) or 'sampler' (Opacus's grad sampler)."""
        return {tape.name: tape.rule for tape in self._tapes}

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for tape in self._tapes for p in tape.params]

    def __enter__(self) -> GhostClipping:
        for tape in self._tapes:
            self._handles.append(tape.layer.register_forward_hook(self._keeper(tape)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for tape in self._tapes:
            tape.clear()

    @staticmethod
    def _keeper(tape: _Tape) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def keep(_layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            if tape.output is not None:
                # Its per-sample gradient would be a sum over the calls: not what these rules compute.
                raise UnsupportedLayer(f"layer {tape.name} ran twice in one forward pass; ghost clipping clips "
                                       "layers that run once (privacy.dp_sgd.clipping: per_sample handles it)")
            tape.activation = inputs[0].detach()
            tape.output, tape.output_version = output, output._version
        return keep

    def per_sample_norms(self, loss_sum: Tensor, *, batch_size: int) -> Tensor:
        """Each example's whole gradient norm, for the loss summed (not averaged) over the batch.

        Runs the one backward pass (to the layers' outputs only: parameters get no .grad).
        """
        outputs: list[Tensor] = []
        for tape in self._tapes:
            if tape.output is None or tape.activation is None:
                raise RuntimeError(f"layer {tape.name} did not run in the forward pass")
            # Row i must be example i: a layer that saw the batch folded (or no batch) would be
            # given a wrong per-sample norm, and the clipping bound would not hold.
            batched_dims = 4 if isinstance(tape.layer, nn.Conv2d) else None
            if (tape.activation.dim() < 2 or len(tape.activation) != batch_size or len(tape.output) != batch_size
                    or (batched_dims is not None and tape.activation.dim() != batched_dims)):
                raise RuntimeError(f"layer {tape.name} ran on an input of shape {tuple(tape.activation.shape)}, "
                                   f"not on the batch of {batch_size} examples first: ghost clipping cannot "
                                   "tell its examples apart")
            if tape.output._version != tape.output_version:
                raise RuntimeError(f"the output of layer {tape.name} was modified in place after it ran: its "
                                   "gradient would be the modified tensor's, not the layer's")
            outputs.append(tape.output)
        backprops = torch.autograd.grad(loss_sum, outputs, allow_unused=True, materialize_grads=True)
        squared: Tensor | None = None
        for tape, backprop in zip(self._tapes, backprops, strict=True):
            tape.backprop = backprop.detach()
            tape.output = None  # the graph is not kept past the backward pass
            if tape.rule == "ghost":
                layer_squared = _ghost_squared_norms(tape)
            else:
                assert tape.activation is not None
                tape.per_sample = (_channel_per_sample(tape) if tape.rule == "channel"
                                   else _grad_samplers()[type(tape.layer)](tape.layer, [tape.activation], backprop))
                layer_squared = torch.stack([g.reshape(len(g), -1).square().sum(1)
                                             for g in tape.per_sample.values()], dim=1).sum(1)
            squared = layer_squared if squared is None else squared + layer_squared
        assert squared is not None  # GhostClipping holds at least one trainable layer
        return squared.sqrt()

    def clipped_noised_gradients(self, loss_sum: Tensor, *, batch_size: int) -> None:
        """Set each parameter's .grad to (sum of clipped per-sample gradients + noise) / expected batch size."""
        norms = self.per_sample_norms(loss_sum, batch_size=batch_size)
        factors = (self.max_grad_norm / (norms + _OPACUS_NORM_EPSILON)).clamp(max=1.0)
        # Norms are at most sqrt(float max) each: their sum is finite exactly when every one is.
        if not math.isfinite(float(norms.sum())):
            finite = torch.isfinite(norms)
            # Opacus 1.6 multiplies a NaN factor into the sum and the model's parameters become NaN.
            # Leaving such an example out keeps the step a Gaussian mechanism of sensitivity C.
            self._drop_examples(~finite)
            factors = torch.where(finite, factors, torch.zeros_like(factors))
        # Dividing the factors by the expected batch size divides the sums by it (one small tensor).
        factors = factors / self.expected_batch_size
        for tape in self._tapes:
            if tape.rule == "ghost":
                sums = _ghost_clipped_sums(tape, factors)
            else:
                sums = {p: torch.einsum("i,i...->...", factors, g) for p, g in tape.per_sample.items()}
            for param in tape.params:
                param.grad = self._noised(sums[param])
            tape.clear()

    def noise_only_gradients(self) -> None:
        """An empty batch's step: the clipped sum is zero, and the noise is the whole gradient."""
        for param in self.parameters:
            param.grad = self._noised(torch.zeros_like(param))

    def _noised(self, averaged_sum: Tensor) -> Tensor:
        """averaged_sum + N(0, (noise_multiplier * C / expected batch size)^2) per coordinate.

        What DPOptimizer's add_noise and scale_grad give: (sum + N(0, (noise_multiplier * C)^2)) / expected
        batch size; drawn around the mean in one call.
        """
        std = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
        if std > 0:
            return torch.normal(mean=averaged_sum, std=std, generator=self.generator)
        return averaged_sum

    def _drop_examples(self, dropped: Tensor) -> None:
        count = int(dropped.sum())
        self.non_finite_examples += count
        log.warning("DP-SGD: %d of %d examples in this batch have a NaN or infinite gradient norm; they are left "
                    "out of this step's clipped sum", count, len(dropped))
        for tape in self._tapes:
            # 0 * inf is NaN: zero the examples' rows rather than weighting them by 0.
            for name in ("activation", "backprop"):
                tensor = getattr(tape, name)
                setattr(tape, name, tensor.masked_fill(dropped.view(-1, *[1] * (tensor.dim() - 1)), 0.0))
            tape.per_sample = {p: g.masked_fill(dropped.view(-1, *[1] * (g.dim() - 1)), 0.0)
                               for p, g in tape.per_sample.items()}
