"""The batch-independent competitors of batch norm, behind the same interface as the others:
``frn``, ``evonorm_s0``, ``evonorm_b0``, ``switchable`` and ``dyt`` (weight standardization is
an option of the layers in :mod:`normkit.nn`, ``weight_standardization=True``).

Each takes x of shape (N, C) or (N, C, *spatial) with the channels at axis 1 (Dynamic Tanh also
takes ``axis``); statistics come from the statistics engine (:mod:`normkit.kernels._engine`),
the rest from the small kernels of :mod:`normkit.kernels.pointwise`. Every definition follows
its paper or its authors' code; where timm (the PyTorch image-models library, the outside
oracle of the tests) differs, the class docstring says how.

FRN + TLU and the EvoNorms are normalization-*activation* layers: they replace "norm + ReLU",
so a network puts no ReLU after them.
"""
from __future__ import annotations

from numbers import Real

import numpy as np

from .kernels import _engine
from .kernels import pointwise as _pw
from .norms import (_ChannelNorm, _check_bool, _check_momentum, _check_positive_int,
                    check_out, register)

__all__ = ["FilterResponseNorm", "EvoNormS0", "EvoNormB0", "SwitchableNorm", "DynamicTanh"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - np.max(logits))
    return z / z.sum()


def _softmax_backward(weights: np.ndarray, dweights: np.ndarray) -> np.ndarray:
    """d logits from d weights, weights = softmax(logits): w * (dw - <w, dw>)."""
    return weights * (dweights - np.dot(weights, dweights))


class _SpatialNorm(_ChannelNorm):
    """Channels at axis 1, statistics per (sample, channel) or pooled from them: x (N, C, *S)
    seen as x3 (N, C, L) and x4 (N, C, 1, L). ``min_spatial``: the fewest values per (sample,
    channel) the norm's statistics need."""

    min_spatial = 1

    def __init__(self, num_features, *, eps, dtype):
        super().__init__(num_features, eps=eps, affine=True, axis=1, dtype=dtype)

    def _check(self, x, training):
        super()._check(x, training)
        L = x.size // (x.shape[0] * self.num_features)
        if L < self.min_spatial:
            raise ValueError(f"{type(self).__name__} needs more than 1 spatial element per "
                             f"channel (its instance statistics), got input size {x.shape}")

    def _views(self, a):
        N, C = a.shape[0], self.num_features
        L = a.size // (N * C)
        return a.reshape(N, C, L), a.reshape(N, C, 1, L)

    def _instance_statistics(self, x4):
        """Mean and biased variance per (sample, channel), float64 (N, C), from the engine."""
        N, C = x4.shape[0], x4.shape[1]
        mean, var = np.empty((N, C)), np.empty((N, C))
        _engine.run_forward(x4, 1, self._gamma.reshape(C, 1), self._beta.reshape(C, 1),
                            self.eps, True, _engine.NO_MASK, False, x4, mean, var, np.empty(N),
                            _engine.STATS_ONLY)
        return mean, var

    def _per_sample_backward(self, dy, x, mean, var, eps, centered, frozen, dx):
        """The engine's backward on the view (1, N*C, 1, L): one group per (sample, channel),
        so the sums come back per (n, c): returns (sum dy * xhat, sum dy), float64 (N, C)."""
        N, C = x.shape[0], self.num_features
        G, L = N * C, x.size // (N * C)
        gamma = np.tile(self._gamma, N).reshape(G, 1)            # (N*C, 1)
        sum_dy_xhat, sum_dy = np.empty((G, 1)), np.empty((G, 1))
        _engine.run_backward(dy.reshape(1, G, 1, L), x.reshape(1, G, 1, L), 1, gamma,
                             mean.reshape(1, G), var.reshape(1, G), np.full(1, float(L)), eps,
                             centered, frozen, _engine.NO_MASK, False, dx.reshape(1, G, 1, L),
                             sum_dy_xhat, sum_dy)
        return sum_dy_xhat.reshape(N, C), sum_dy.reshape(N, C)


@register("frn")
class FilterResponseNorm(_SpatialNorm):
    """Filter response normalization with its thresholded linear unit (Singh & Krishnan, CVPR
    2020): per sample and channel nu2 = mean(x^2) over the spatial axes, then
    ``z = max(gamma * x / sqrt(nu2 + eps) + beta, tau)``, tau learned per channel (init 0).

    ``eps`` defaults to the paper's 1e-6 (timm's FilterResponseNormTlu2d: 1e-5).
    ``learned_eps=True`` is the paper's option for 1x1 maps (and (N, C) input): the eps used is
    ``eps + |eps_l|`` with a learned scalar ``params["eps_l"]`` initialized to 1e-4. A
    normalization-activation layer: it replaces "norm + ReLU".
    """

    def __init__(self, num_features, *, eps=1e-6, learned_eps=False, dtype=np.float32):
        super().__init__(num_features, eps=eps, dtype=dtype)
        self._add_param("tau", np.zeros(self.num_features))
        self.learned_eps = _check_bool("learned_eps", learned_eps)
        if self.learned_eps:
            self._add_param("eps_l", np.full(1, 1e-4))

    def _eps(self) -> float:
        return self.eps + abs(float(self.params["eps_l"][0])) if self.learned_eps else self.eps

    def _forward(self, x, training, mask, out):
        x3, x4 = self._views(x)
        N, C, L = x3.shape
        eps = self._eps()
        y = check_out(out, x.shape, self.dtype, x)
        mean_square = np.empty((N, C))
        _engine.run_forward(x4, 1, self._gamma.reshape(C, 1), self._beta.reshape(C, 1), eps,
                            False, _engine.NO_MASK, False, y.reshape(x4.shape), np.empty((N, C)),
                            mean_square, np.empty(N), _engine.STATS_AND_APPLY)
        _pw.tlu_forward(y.reshape(x3.shape), self.params["tau"])
        return y, (x, mean_square, eps), None

    def _backward(self, dy, saved, out):
        x, mean_square, eps = saved
        x3, _ = self._views(x)
        inv_rms = 1.0 / np.sqrt(mean_square + eps)                      # (N, C)
        scale = (self._gamma.astype(np.float64) * inv_rms).astype(self.dtype)
        dy_pre = np.empty_like(x)
        dtau = np.empty(self.num_features)
        _pw.tlu_backward(dy.reshape(x3.shape), x3, scale, self._beta, self.params["tau"],
                         dy_pre.reshape(x3.shape), dtau)
        dx = check_out(out, x.shape, self.dtype, x, dy)
        sum_dy_xhat, sum_dy = self._per_sample_backward(
            dy_pre, x, np.zeros_like(mean_square), mean_square, eps, False, False, dx)
        grads = {"gamma": sum_dy_xhat.sum(0), "beta": sum_dy.sum(0), "tau": dtau}
        if self.learned_eps:
            # d/d eps of gamma x (nu2 + eps)^(-1/2) = -1/2 gamma x inv^3: summed with dy_pre it is
            # -1/2 gamma inv^2 sum(dy_pre xhat); d eps / d eps_l = sign(eps_l).
            deps = -0.5 * np.sum(self._gamma * inv_rms ** 2 * sum_dy_xhat)
            grads["eps_l"] = np.array([deps * np.sign(self.params["eps_l"][0])])
        return dx, grads

    def _describe(self):
        return f"{self.num_features}, eps={self.eps}, learned_eps={self.learned_eps}"


def _default_groups(channels: int) -> int:
    """The authors' rule (tensorflow/tpu resnet_model.py): 32 groups, fewer until they divide C."""
    groups = 32
    while groups > 1 and channels % groups:
        groups -= 1
    return groups


@register("evonorm_s0")
class EvoNormS0(_SpatialNorm):
    """EvoNorm-S0 (Liu, Brock, Simonyan, Le, NeurIPS 2020), batch-independent:
    ``y = x * sigmoid(v * x) / sqrt(group_var(x) + eps) * gamma + beta``, the variance (biased)
    per sample over each group of C / num_groups channels and the spatial axes; v, gamma init 1,
    beta 0. ``num_groups`` defaults to the authors' rule: 32, or the largest number below it
    that divides C (timm's EvoNorm2dS0 asserts 32 divides C); eps 1e-5 as the authors and timm.
    A normalization-activation layer: it replaces "norm + ReLU". Same computation in training
    and evaluation.
    """

    def __init__(self, num_features, *, num_groups=None, eps=1e-5, dtype=np.float32):
        super().__init__(num_features, eps=eps, dtype=dtype)
        C = self.num_features
        if num_groups is None:
            num_groups = _default_groups(C)
        num_groups = _check_positive_int("num_groups", num_groups)
        if C % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_features={C}")
        self.num_groups = num_groups
        self._add_param("v", np.ones(C))

    def _check(self, x, training):
        super()._check(x, training)
        if x.size // (x.shape[0] * self.num_groups) < 2:
            raise ValueError(f"EvoNorm-S0 needs more than 1 value per group, got input size "
                             f"{x.shape} with num_groups={self.num_groups}")

    def _forward(self, x, training, mask, out):
        x3, _ = self._views(x)
        N, C, L = x3.shape
        G = self.num_groups
        xg = x.reshape(N, G, C // G, L)                                 # (N, G, C/G, L)
        mean, var = np.empty((N, G)), np.empty((N, G))
        _engine.run_forward(xg, 1, self._gamma.reshape(G, C // G), self._beta.reshape(G, C // G),
                            self.eps, True, _engine.NO_MASK, False, xg, mean, var, np.empty(N),
                            _engine.STATS_ONLY)
        y = check_out(out, x.shape, self.dtype, x)
        _pw.run_evonorm_s0_forward(x3, self.params["v"], self._gamma, self._beta, var,
                                   self.eps, y.reshape(x3.shape))
        return y, (x, mean, var), None

    def _backward(self, dy, saved, out):
        x, mean, var = saved
        x3, _ = self._views(x)
        dx = check_out(out, x.shape, self.dtype, x, dy)
        part = np.empty((3,) + x3.shape[:2])                            # (3, N, C)
        _pw.run_evonorm_s0_backward(dy.reshape(x3.shape), x3, self.params["v"], self._gamma,
                                    mean, var, self.eps, dx.reshape(x3.shape), part)
        dgamma, dbeta, dv = part.sum(axis=1)
        return dx, {"gamma": dgamma, "beta": dbeta, "v": dv}

    def _describe(self):
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"


class _RunningBatchNorm(_SpatialNorm):
    """The batch statistics' running averages of EvoNorm-B0 and switchable norm: PyTorch's rule
    (``momentum`` the weight of the new batch, running_var the unbiased variance)."""

    min_spatial = 2
    #: Whether ``state`` holds a running_mean (EvoNorm-B0 uses the variance only).
    keeps_running_mean = True

    def __init__(self, num_features, *, eps, momentum, dtype):
        super().__init__(num_features, eps=eps, dtype=dtype)
        self.momentum = _check_momentum(momentum)
        C = self.num_features
        if self.keeps_running_mean:
            self.state["running_mean"] = np.zeros(C, self.dtype)
        self.state["running_var"] = np.ones(C, self.dtype)
        self.state["num_batches_tracked"] = np.zeros((), np.int64)

    def _pooled(self, inst_mean, inst_var):
        """(layer_mean, layer_var) (N,) and (batch_mean, batch_var) (C,) from instance ones."""
        N, C = inst_mean.shape
        layer_mean, layer_var, batch_mean, batch_var = np.empty(N), np.empty(N), np.empty(C), \
            np.empty(C)
        _pw.pool_statistics(inst_mean, inst_var, layer_mean, layer_var, batch_mean, batch_var)
        return layer_mean, layer_var, batch_mean, batch_var

    def _running(self):
        running_mean = self.state.get("running_mean", np.zeros(self.num_features))
        return (running_mean.astype(np.float64), self.state["running_var"].astype(np.float64))

    def _commit(self, batch_mean, batch_var, count):
        def commit():
            state = self.state
            running_mean = state.get("running_mean", np.zeros(self.num_features))
            _engine.running_update(running_mean.reshape(1, -1),
                                   state["running_var"].reshape(1, -1),
                                   state["num_batches_tracked"].reshape(1),
                                   batch_mean.reshape(1, -1), batch_var.reshape(1, -1),
                                   np.full(1, float(count)), self.momentum, False, False)
        return commit

    def _describe(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


@register("evonorm_b0")
class EvoNormB0(_RunningBatchNorm):
    """EvoNorm-B0 (Liu et al., NeurIPS 2020):
    ``y = x / max(sqrt(batch_var + eps), v * x + sqrt(instance_var + eps)) * gamma + beta``,
    batch_var per channel over (N, *spatial), instance_var per (sample, channel), both biased;
    v, gamma init 1, beta 0. Evaluation uses ``running_var`` in place of batch_var (the batch
    variance carries gradient in training). eps 1e-5 as the authors' code (timm's EvoNorm2dB0:
    1e-3); ``running_var`` follows PyTorch and timm (unbiased, momentum the weight of the new
    batch, 0.1 = the authors' decay 0.9; the authors average the biased variance); no running
    mean (B0 uses none). A normalization-activation layer: it replaces "norm + ReLU". Needs more
    than one spatial element per channel.
    """

    keeps_running_mean = False

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__(num_features, eps=eps, momentum=momentum, dtype=dtype)
        self._add_param("v", np.ones(self.num_features))

    def _forward(self, x, training, mask, out):
        x3, x4 = self._views(x)
        inst_mean, inst_var = self._instance_statistics(x4)
        if training:
            _, _, batch_mean, batch_var = self._pooled(inst_mean, inst_var)
            commit = self._commit(batch_mean, batch_var, x.size // self.num_features)
        else:
            (batch_mean, batch_var), commit = self._running(), None
        y = check_out(out, x.shape, self.dtype, x)
        _pw.evonorm_b0_forward(x3, self.params["v"], self._gamma, self._beta, batch_var,
                               inst_var, self.eps, y.reshape(x3.shape))
        return y, (x, inst_mean, inst_var, batch_mean, batch_var, training), commit

    def _backward(self, dy, saved, out):
        x, inst_mean, inst_var, batch_mean, batch_var, training = saved
        x3, _ = self._views(x)
        dx = check_out(out, x.shape, self.dtype, x, dy)
        part = np.empty((3,) + x3.shape[:2])                            # (3, N, C)
        _pw.evonorm_b0_backward(dy.reshape(x3.shape), x3, self.params["v"], self._gamma,
                                batch_mean, batch_var, inst_mean, inst_var, self.eps, training,
                                dx.reshape(x3.shape), part)
        dgamma, dbeta, dv = part.sum(axis=1)
        return dx, {"gamma": dgamma, "beta": dbeta, "v": dv}


@register("switchable")
class SwitchableNorm(_RunningBatchNorm):
    """Switchable normalization (Luo, Ren, Peng, Zhang, Li, ICLR 2019): y = gamma * (x - mu) /
    sqrt(var + eps) + beta with ``mu = sum_k softmax(mean_weight)_k mu_k`` and ``var = sum_k
    softmax(var_weight)_k var_k`` over k = (instance, layer, batch): per (sample, channel), per
    sample over (C, *spatial), per channel over (N, *spatial). Separate mixing logits for the
    means and the variances, each init 1 (equal weights), as the authors' code. Every variance
    is the biased one, as the paper's equations (the authors' code takes the unbiased instance
    variance); layer and batch statistics are pooled from the instance ones exactly. Evaluation
    uses running_mean/running_var for the batch term (PyTorch's rule: momentum 0.1 the weight of
    the new batch, unbiased running_var starting at 1; the authors' code starts both at 0).
    Needs more than one spatial element per channel.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__(num_features, eps=eps, momentum=momentum, dtype=dtype)
        self._add_param("mean_weight", np.ones(3))
        self._add_param("var_weight", np.ones(3))

    def _forward(self, x, training, mask, out):
        _, x4 = self._views(x)
        N, C = x4.shape[0], x4.shape[1]
        inst_mean, inst_var = self._instance_statistics(x4)
        layer_mean, layer_var, batch_mean, batch_var = self._pooled(inst_mean, inst_var)
        commit = None
        if training:
            commit = self._commit(batch_mean, batch_var, x.size // C)
        else:
            batch_mean, batch_var = self._running()
        means = (inst_mean, np.broadcast_to(layer_mean[:, None], (N, C)),
                 np.broadcast_to(batch_mean[None, :], (N, C)))
        variances = (inst_var, np.broadcast_to(layer_var[:, None], (N, C)),
                     np.broadcast_to(batch_var[None, :], (N, C)))
        w_mean = _softmax(self.params["mean_weight"])
        w_var = _softmax(self.params["var_weight"])
        mean = sum(w * m for w, m in zip(w_mean, means))                  # (N, C)
        var = sum(w * v for w, v in zip(w_var, variances))
        y = check_out(out, x.shape, self.dtype, x)
        _engine.run_forward(x4, 1, self._gamma.reshape(C, 1), self._beta.reshape(C, 1), self.eps,
                            True, _engine.NO_MASK, False, y.reshape(x4.shape), mean, var,
                            np.empty(N), _engine.APPLY_ONLY)
        return y, (x, mean, var, means, variances, w_mean, w_var, training), commit

    # With dxhat = gamma dy, inv = (var + eps)^(-1/2), per (n, c):
    #   dmu = -gamma inv sum(dy)        dvar = -1/2 gamma inv^2 sum(dy xhat)
    # mu_k and var_k are means over the (n, c, l) of their group (L, C L or N L values), so
    #   dx = gamma inv dy + sum_k w_k dmu_k / M_k + sum_k w'_k dvar_k 2 (x - mu_k) / M_k
    # with dmu_k, dvar_k the sums of dmu, dvar over the group. Written as
    # dx = gamma inv dy + const + coef (x - mu_instance), the mu_k - mu_instance going into const.
    # Evaluation: the batch term is a constant. d weight_k = sum dmu mu_k, then through softmax.
    def _backward(self, dy, saved, out):
        x, mean, var, means, variances, w_mean, w_var, training = saved
        x3, _ = self._views(x)
        N, C, L = x3.shape
        dx = check_out(out, x.shape, self.dtype, x, dy)
        sum_dy_xhat, sum_dy = self._per_sample_backward(dy, x, mean, var, self.eps, True, True,
                                                        dx)
        gamma = self._gamma.astype(np.float64)
        inv = 1.0 / np.sqrt(var + self.eps)
        dmu = -gamma * inv * sum_dy                                      # (N, C)
        dvar = -0.5 * gamma * inv ** 2 * sum_dy_xhat
        sizes = (L, C * L, N * L)
        group_sum = (lambda a: a, lambda a: np.broadcast_to(a.sum(1, keepdims=True), (N, C)),
                     lambda a: np.broadcast_to(a.sum(0, keepdims=True), (N, C)))
        terms = range(3) if training else range(2)
        const = np.zeros((N, C))
        coef = np.zeros((N, C))
        for k in terms:
            dmu_k = w_mean[k] * group_sum[k](dmu)
            dvar_k = 2.0 * w_var[k] * group_sum[k](dvar) / sizes[k]
            const += dmu_k / sizes[k] + dvar_k * (means[0] - means[k])
            coef += dvar_k
        _pw.add_centered(dx.reshape(x3.shape), x3, const, coef, means[0])
        d_mean_weight = np.array([np.sum(dmu * m) for m in means])
        d_var_weight = np.array([np.sum(dvar * v) for v in variances])
        return dx, {"gamma": sum_dy_xhat.sum(0), "beta": sum_dy.sum(0),
                    "mean_weight": _softmax_backward(w_mean, d_mean_weight),
                    "var_weight": _softmax_backward(w_var, d_var_weight)}


@register("dyt")
class DynamicTanh(_ChannelNorm):
    """Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, CVPR 2025, "Transformers without
    Normalization"): ``y = gamma * tanh(alpha * x) + beta``, alpha a learned scalar
    (``params["alpha"]``, shape (1,), init ``alpha=0.5`` as the authors' code), gamma/beta per
    channel (init 1, 0). No statistic at all: same computation in training and evaluation, and
    any batch size. ``axis``: the channel axis (1; -1 for channels-last (N, T, D) as in a
    transformer)."""

    def __init__(self, num_features, *, alpha=0.5, axis=1, dtype=np.float32):
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not np.isfinite(alpha):
            raise ValueError(f"alpha (its initial value) must be a finite number, got {alpha!r}")
        super().__init__(num_features, eps=1.0, affine=True, axis=axis, dtype=dtype)
        self.alpha_init = float(alpha)
        self._add_param("alpha", np.full(1, alpha))

    def _view3(self, a):
        pre, C, post, _ = self._split(a)
        return a.reshape(pre, C, post)

    def _forward(self, x, training, mask, out):
        y = check_out(out, x.shape, self.dtype, x)
        _pw.dyt_forward(self._view3(x), float(self.params["alpha"][0]), self._gamma, self._beta,
                        self._view3(y))
        return y, (x,), None

    def _backward(self, dy, saved, out):
        x = saved[0]
        dx = check_out(out, x.shape, self.dtype, x, dy)
        C = self.num_features
        dgamma, dbeta = np.empty(C), np.empty(C)
        dalpha = _pw.dyt_backward(self._view3(dy), self._view3(x), float(self.params["alpha"][0]),
                                  self._gamma, self._view3(dx), dgamma, dbeta)
        return dx, {"gamma": dgamma, "beta": dbeta, "alpha": np.array([dalpha])}

    def _describe(self):
        axis = "" if self.axis == 1 else f", axis={self.axis}"
        return f"{self.num_features}, alpha={self.alpha_init}{axis}"
