"""The norm cases every test module shares: odd shapes, each with its oracles.

A case builds a normkit norm with random (non-trivial) parameters and knows how to compute the
same thing with ``normkit.reference`` (plain NumPy) and with PyTorch (autograd), so tests can
compare forward, backward and running statistics against both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import normkit
from normkit import reference as ref

# float64 results agree to rounding; float32 kernels accumulate statistics in float64, so they
# differ from an exact computation by a few float32 ulps of the output (|y| ~ 1..4).
TOL = {np.float64: dict(rtol=1e-10, atol=1e-11), np.float32: dict(rtol=2e-5, atol=2e-5)}


@dataclass(frozen=True)
class Case:
    name: str                       # registry name
    shape: tuple                    # input shape
    args: tuple = ()                # positional args of make() after the name
    kwargs: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}{self.shape}{'[' + extra + ']' if extra else ''}"

    @property
    def has_running_stats(self) -> bool:
        return self.name in ("batch", "ghost", "renorm")

    def make(self, dtype, seed=0, **overrides) -> normkit.Norm:
        norm = normkit.make(self.name, *self.args, dtype=dtype, **{**self.kwargs, **overrides})
        rng = np.random.default_rng(seed)
        for key, value in norm.params.items():   # non-trivial gamma/beta
            value[...] = rng.uniform(0.5, 1.5, value.shape) * rng.choice([-1, 1], value.shape) \
                if key == "gamma" else rng.standard_normal(value.shape)
        return norm

    def input(self, dtype, seed=1) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return (rng.standard_normal(self.shape) * 2 + 0.5).astype(dtype)

    # -- the NumPy oracle --------------------------------------------------------------------
    def reference_forward(self, norm, x, training):
        """(y, new_running_mean, new_running_var) computed by normkit.reference."""
        p, eps = norm.params, getattr(norm, "eps", None)
        gamma, beta = p.get("gamma"), p.get("beta")
        if self.name in ("batch", "ghost", "renorm"):
            rm, rv = norm.state["running_mean"], norm.state["running_var"]
            if not training:
                return ref.batch_forward_eval(x, gamma, beta, rm, rv, eps), rm, rv
            count = x.size // x.shape[1]
            if self.name == "batch":
                y, mean, var = ref.batch_forward_train(x, gamma, beta, eps)
            elif self.name == "ghost":
                B = norm.virtual_batch_size
                y, means, variances = ref.ghost_forward_train(x, gamma, beta, eps, B)
                count = count * B // x.shape[0]
                mean, unbiased = ref.ghost_batch_stats(means, variances, count)
                var = unbiased * (count - 1) / count
            else:
                y, mean, var, _, _ = ref.renorm_forward_train(x, gamma, beta, rm, rv, eps,
                                                              norm.r_max, norm.d_max)
            momentum = norm.momentum if norm.running_average == "exponential" \
                else 1.0 / (int(norm.state["num_batches_tracked"]) + 1)
            new_mean, new_var = ref.running_update(rm, rv, mean, var, count, momentum)
            return y, new_mean, new_var
        if self.name == "layer":
            return ref.layer_forward(x, gamma, beta, len(norm.normalized_shape), eps)[0], None, None
        if self.name in ("group", "instance"):
            return ref.group_forward(x, gamma, beta, norm.num_groups, eps)[0], None, None
        if self.name == "rms":
            return ref.rms_forward(x, gamma, len(norm.normalized_shape), eps)[0], None, None
        assert self.name == "none"
        return x, None, None

    def reference_backward(self, norm, x, dy, training):
        """{"x": dx, **param grads} from normkit.reference, for state BEFORE the forward."""
        p, eps = norm.params, getattr(norm, "eps", None)
        gamma = p.get("gamma")
        if self.name in ("batch", "ghost", "renorm") and not training:
            dx, dg, db = ref.batch_backward_eval(dy, x, gamma, norm.state["running_mean"],
                                                 norm.state["running_var"], eps)
        elif self.name == "batch":
            dx, dg, db = ref.batch_backward(dy, x, gamma, eps)
        elif self.name == "ghost":
            dx, dg, db = ref.ghost_backward(dy, x, gamma, eps, norm.virtual_batch_size)
        elif self.name == "renorm":
            dx, dg, db = ref.renorm_backward(dy, x, gamma, norm.state["running_mean"],
                                             norm.state["running_var"], eps, norm.r_max, norm.d_max)
        elif self.name == "layer":
            dx, dg, db = ref.layer_backward(dy, x, gamma, len(norm.normalized_shape), eps)
        elif self.name in ("group", "instance"):
            dx, dg, db = ref.group_backward(dy, x, gamma, norm.num_groups, eps)
        elif self.name == "rms":
            dx, dg = ref.rms_backward(dy, x, gamma, len(norm.normalized_shape), eps)
            return {"x": dx, "gamma": dg}
        else:
            return {"x": dy}
        return {"x": dx, "gamma": dg, "beta": db}

    # -- the PyTorch oracle ------------------------------------------------------------------
    def torch_forward(self, torch, norm, xt, training, params_t, state_t):
        """PyTorch's output for the same input, parameters and (copied) running statistics;
        updates state_t in place as PyTorch does."""
        F = torch.nn.functional
        gamma, beta, eps = params_t.get("gamma"), params_t.get("beta"), getattr(norm, "eps", None)
        if self.name == "batch":
            momentum = norm.momentum if norm.running_average == "exponential" else None
            if momentum is None:   # PyTorch's cumulative average: factor 1/num_batches_tracked
                momentum = 1.0 / (int(state_t["num_batches_tracked"]) + 1) if training else 0.0
            if training:
                state_t["num_batches_tracked"] += 1
            return F.batch_norm(xt, state_t["running_mean"], state_t["running_var"], gamma, beta,
                                training=training, momentum=momentum, eps=eps)
        if self.name == "ghost":
            if not training:
                return F.batch_norm(xt, state_t["running_mean"], state_t["running_var"], gamma,
                                    beta, training=False, eps=eps)
            chunks = xt.split(norm.virtual_batch_size)
            outs = [F.batch_norm(c, None, None, gamma, beta, training=True, eps=eps) for c in chunks]
            dims = [0] + list(range(2, xt.ndim))
            with torch.no_grad():
                m = torch.stack([c.mean(dim=dims) for c in chunks]).mean(0)
                v = torch.stack([c.var(dim=dims, unbiased=True) for c in chunks]).mean(0)
                state_t["running_mean"].mul_(1 - norm.momentum).add_(norm.momentum * m)
                state_t["running_var"].mul_(1 - norm.momentum).add_(norm.momentum * v)
            return torch.cat(outs)
        if self.name == "renorm":
            rm, rv = state_t["running_mean"], state_t["running_var"]
            if not training:
                return F.batch_norm(xt, rm, rv, gamma, beta, training=False, eps=eps)
            dims = [0] + list(range(2, xt.ndim))
            shape = [1, -1] + [1] * (xt.ndim - 2)
            mu_b = xt.mean(dim=dims)
            sigma_b = torch.sqrt(xt.var(dim=dims, unbiased=False) + eps)
            sigma = torch.sqrt(rv + eps)
            r = (sigma_b / sigma).clamp(1 / norm.r_max, norm.r_max).detach()
            d = ((mu_b - rm) / sigma).clamp(-norm.d_max, norm.d_max).detach()
            xhat = (xt - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
            with torch.no_grad():
                n = xt.numel() // xt.shape[1]
                rm.mul_(1 - norm.momentum).add_(norm.momentum * mu_b)
                rv.mul_(1 - norm.momentum).add_(norm.momentum * xt.var(dim=dims, unbiased=True))
                assert n > 1
            return gamma.view(shape) * xhat + beta.view(shape)
        if self.name == "layer":
            return F.layer_norm(xt, norm.normalized_shape, gamma, beta, eps)
        if self.name in ("group", "instance"):
            return F.group_norm(xt, norm.num_groups, gamma, beta, eps)
        if self.name == "rms":
            return F.rms_norm(xt, norm.normalized_shape, gamma, eps)
        return xt * 1.0


CASES = [
    Case("batch", (3, 7, 5, 3), (7,)),
    Case("batch", (3, 7, 5), (7,)),
    Case("batch", (3, 7), (7,)),
    Case("batch", (3, 7, 5), (7,), {"running_average": "cumulative"}),
    Case("ghost", (6, 7, 5), (7,), {"virtual_batch_size": 2}),
    Case("ghost", (8, 7), (7,), {"virtual_batch_size": 4}),
    Case("renorm", (3, 7, 5), (7,), {"r_max": 1.5, "d_max": 0.5}),
    Case("renorm", (5, 7), (7,), {"r_max": 2.0, "d_max": 1.0}),
    Case("layer", (3, 7, 5, 3), ((5, 3),)),
    Case("layer", (4, 6), (6,)),
    Case("group", (3, 12, 5, 3), (12,), {"num_groups": 3}),
    Case("group", (3, 12, 5), (12,), {"num_groups": 3}),
    Case("instance", (3, 7, 5), (7,)),
    Case("rms", (3, 7, 5), (5,)),
    Case("rms", (3, 4, 6), ((4, 6),)),
    Case("none", (3, 7), (7,)),
]
