"""An LSTM layer whose normalization is chosen by name: plain LSTM, BN-LSTM or LN-LSTM.

    lstm = LSTM(input_size=1, hidden_size=100, norm="recurrent_batch", max_steps=784)
    out = lstm.forward(x, training=True, lengths=lengths)   # x (T, N, D) time-major
    dx = lstm.backward(d_out)                               # fills lstm.grads
    lstm.params, lstm.grads, lstm.state                     # dicts of arrays owned by the layer

The whole sequence runs in two Numba kernels (``normkit.nn._lstm_kernels.lstm_forward`` and
``lstm_backward``), the norms inside them on the statistics engine: no Python loop over time
steps. With gates (f, i, o, g), row vectors and
W_x (D, 4H), W_h (H, 4H)::

    (f, i, o, g) = Norm_h(h_{t-1} W_h) + Norm_x(x_t W_x) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(Norm_c(c_t))

``norm``:
  - ``"none"``: the plain LSTM (every Norm is the identity).
  - ``"recurrent_batch"``: the BN-LSTM of Cooijmans et al. (2017): batch norm with statistics per
    time step (``normkit.make("recurrent_batch")``) on the input and recurrent terms separately,
    with gamma and no beta (the bias b is the shift), and on c_t with gamma and beta; gammas start
    at ``gamma_init`` = 0.1.
  - ``"layer"``: the LN-LSTM of Ba et al. (2016): layer norm over the 4H (or H) units of each
    example, with gain and bias at all three places as in the paper; gains start at 1.

Padded positions (``mask`` False, or t >= ``lengths[n]``) enter no statistics, carry the state
(h_t = h_{t-1}, c_t = c_{t-1}), output 0 and get gradient 0; the last output is then each
sequence's state after its last valid step.
"""
from __future__ import annotations

import math

import numpy as np

from ..norms import _check_bool, _check_dtype, _check_eps, _check_positive_int, make
from ..recurrent import check_mask, mask_from_lengths
from . import _lstm_kernels as _kernels

__all__ = ["LSTM"]

_KINDS = {"none": _kernels.NORM_NONE, "recurrent_batch": _kernels.NORM_BATCH,
          "layer": _kernels.NORM_LAYER}
_SITES = ("x", "h", "c")           # the input term, the recurrent term, the cell


def _orthogonal(rng, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    return q if rows >= cols else q.T


class LSTM:
    """One LSTM layer over time-major sequences x (T, N, input_size).

    Parameters (``params``, updated in place by an optimizer; ``grads`` has the same keys):
    ``W_x`` (D, 4H), ``W_h`` (H, 4H), ``b`` (4H,), and per normalization ``gamma_x``, ``gamma_h``
    (4H,), ``gamma_c``, ``beta_c`` (H,) (+ ``beta_x``, ``beta_h`` for ``"layer"``).
    ``state``: the running statistics of the three recurrent batch norms (``running_mean_x``,
    ``running_var_x``, ``num_batches_tracked_x``, same for ``_h`` and ``_c``), per time step.

    Options: ``max_steps``, ``per_step``, ``grow``, ``momentum``, ``eps`` as for
    ``normkit.make("recurrent_batch")`` (``per_step=False``: one set of running statistics for
    all steps; the recurrent and cell terms still normalize each step with its own batch
    statistics in training, since pooling them over time would need the future steps).
    ``gamma_init`` (default 0.1 for BN, 1 for LN), ``forget_bias`` (added to b's forget block),
    ``recurrent_init`` "identity" or "orthogonal" for W_h (W_x is orthogonal per gate),
    ``h0_noise_std``: in training without an explicit h0, h0 ~ N(0, std^2) (the paper used 0.1
    for BN-LSTM on sequential MNIST; 0 gives h0 = 0), ``return_sequences``: output all hidden
    states (T, N, H) or only the last (N, H). ``input_norm=False`` leaves the input term
    x_t W_x unnormalized (no ``gamma_x``/``beta_x``; Norm_x is the identity), e.g. an LN-LSTM
    whose layer norm acts on the recurrence only: with one input value per step, x_t W_x is
    rank one and its layer norm keeps only the sign of x_t.
    """

    def __init__(self, input_size, hidden_size, *, norm="none", max_steps=None, per_step=True,
                 grow=False, eps=1e-5, momentum=0.1, gamma_init=None, forget_bias=1.0,
                 recurrent_init="identity", h0_noise_std=0.0, return_sequences=True,
                 input_norm=True, seed=0, dtype=np.float32):
        if norm not in _KINDS:
            raise ValueError(f"norm must be one of {sorted(_KINDS)} (names from normkit.make), "
                             f"got {norm!r}")
        if recurrent_init not in ("identity", "orthogonal"):
            raise ValueError(f"recurrent_init must be 'identity' or 'orthogonal', got {recurrent_init!r}")
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.norm = norm
        self.dtype = _check_dtype(dtype)
        self.eps = _check_eps(eps)
        self.return_sequences = _check_bool("return_sequences", return_sequences)
        self.input_norm = _check_bool("input_norm", input_norm)
        self.h0_noise_std = _check_nonnegative("h0_noise_std", h0_noise_std)
        forget_bias = _check_finite("forget_bias", forget_bias)
        if gamma_init is None:
            gamma_init = 0.1 if norm == "recurrent_batch" else 1.0
        gamma_init = _check_finite("gamma_init", gamma_init)
        self._kind = _KINDS[norm]
        self._rng = np.random.default_rng(seed)
        D, H = self.input_size, self.hidden_size

        W_x = np.concatenate([_orthogonal(self._rng, D, H) for _ in range(4)], axis=1)
        if recurrent_init == "identity":
            W_h = np.tile(np.eye(H), (1, 4))
        else:
            W_h = np.concatenate([_orthogonal(self._rng, H, H) for _ in range(4)], axis=1)
        b = np.zeros(4 * H)
        b[:H] = forget_bias
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        for key, value in (("W_x", W_x), ("W_h", W_h), ("b", b)):
            self.params[key] = np.array(value, dtype=self.dtype, order="C")
            self.grads[key] = np.zeros_like(self.params[key])

        self.norms = {}                        # site -> the registry's Norm holding its params
        if norm == "recurrent_batch":
            common = dict(max_steps=max_steps, per_step=per_step, grow=grow, eps=eps,
                          momentum=momentum, dtype=self.dtype)
            self.norms = {"x": make(norm, 4 * H, bias=False, **common),
                          "h": make(norm, 4 * H, bias=False, **common),
                          "c": make(norm, H, **common)}
        elif norm == "layer":
            self.norms = {"x": make(norm, 4 * H, eps=eps, dtype=self.dtype),
                          "h": make(norm, 4 * H, eps=eps, dtype=self.dtype),
                          "c": make(norm, H, eps=eps, dtype=self.dtype)}
        if not self.input_norm:
            self.norms.pop("x", None)
        for site, site_norm in self.norms.items():
            site_norm.params["gamma"][...] = gamma_init
            for key in site_norm.params:
                self.params[f"{key}_{site}"] = site_norm.params[key]
                self.grads[f"{key}_{site}"] = site_norm.grads[key]
        self._saved = None
        self._work = None                      # ((T, N), forward arrays, backward arrays)
        self.dh0 = self.dc0 = None             # dL/dh0, dL/dc0 of the last backward

    @property
    def state(self) -> dict[str, np.ndarray]:
        """Running statistics of the recurrent batch norms (empty for "none" and "layer")."""
        if self.norm != "recurrent_batch":
            return {}
        return {f"{key}_{site}": value for site, site_norm in self.norms.items()
                for key, value in site_norm.state.items()}

    # -- checks -------------------------------------------------------------------------------
    def _check_array(self, name, a, shape) -> np.ndarray:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if a.dtype != self.dtype:
            if a.dtype not in (np.float32, np.float64):
                raise TypeError(f"{name} must be a float32 or float64 array (this LSTM holds "
                                f"{self.dtype}), got dtype {a.dtype}; cast {name}")
            raise TypeError(f"{name} has dtype {a.dtype} but this LSTM holds {self.dtype} "
                            f"parameters; build it with dtype=np.{a.dtype} or cast {name}")
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
        return np.ascontiguousarray(a)

    def _check_x(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"x must be time-major (T, N, input_size) with input_size="
                             f"{self.input_size}, got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"x is empty: shape {x.shape}")
        return self._check_array("x", x, x.shape)

    def _check_params(self) -> None:
        for key, value in self.params.items():
            if not np.isfinite(value).all():
                raise ValueError(f"params[{key!r}] contains NaN or inf; refusing to run with it")

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x, training, *, mask=None, lengths=None, h0=None, c0=None) -> np.ndarray:
        """Run the sequence x (T, N, D). ``mask`` (T, N) bool or ``lengths`` (N,) mark the valid
        positions; ``h0``, ``c0`` (N, H) default to 0 (h0: noise in training if
        ``h0_noise_std``). Returns (T, N, H) or, if not ``return_sequences``, (N, H)."""
        training = _check_bool("training", training)
        x = self._check_x(x)
        T, N, D = x.shape
        H = self.hidden_size
        if mask is not None and lengths is not None:
            raise ValueError("give either mask or lengths, not both")
        if lengths is not None:
            mask = mask_from_lengths(lengths, T)
            if mask.shape[1] != N:
                raise ValueError(f"lengths must have one entry per sequence (N = {N}), got "
                                 f"{mask.shape[1]}")
        mask = check_mask(mask, T, N)
        if h0 is not None:
            h0 = self._check_array("h0", h0, (N, H))
        if c0 is not None:
            c0 = self._check_array("c0", c0, (N, H))
        if training and self.norm == "recurrent_batch":
            valid = np.full(T, N) if mask is None else mask.sum(axis=1)
            if self.input_norm:
                self.norms["x"].check_training(T, valid)
            for site in ("h", "c"):
                self.norms[site].check_training(T, valid, statistics_per_step=True)
        self._check_params()
        # -- nothing below refuses the call --
        if training:
            for site_norm in self.norms.values():
                if hasattr(site_norm, "grow_to"):
                    site_norm.grow_to(T)
        if mask is not None:                   # padded positions may hold anything, even NaN
            x = np.where(mask[:, :, None], x, 0).astype(self.dtype)
        full_mask = np.ones((T, N), np.bool_) if mask is None else mask
        xw = _input_product(x.reshape(T * N, D), self.params["W_x"]).reshape(T, N, 4 * H)
        xn = self._input_norm_forward(xw, training, mask)
        if h0 is None:
            h0 = np.zeros((N, H), self.dtype)
            if training and self.h0_noise_std > 0:
                h0 = (self._rng.standard_normal((N, H)) * self.h0_noise_std).astype(self.dtype)
        if c0 is None:
            c0 = np.zeros((N, H), self.dtype)
        batch_stats = training
        saved = self._workspace(T, N)[0]
        _kernels.lstm_forward(xn, self.params["W_h"], self.params["b"], h0, c0, full_mask,
                              self._kind, batch_stats, *self._site_arrays("h"),
                              *self._site_arrays("c"), self._frozen("h"), self._frozen("c"),
                              self.eps, *saved)
        if training and self.norm == "recurrent_batch":
            self._update_recurrent_stats(saved[5:])
        self._saved = (x, full_mask, batch_stats, saved)
        h = saved[0]
        if not self.return_sequences:
            return h[T].copy()
        out = h[1:].copy()
        if mask is not None:
            out[~mask] = 0
        return out

    def _workspace(self, T, N):
        """The kernels' arrays for sequences (T, N), kept from call to call (allocated anew only
        when T or N changes): forward (h, c, r, gates, tanh_cn, stats_h, stats_c) as
        :func:`_forward_arrays`, backward (dxn, dr). The layer returns copies, never these."""
        if self._work is None or self._work[0] != (T, N):
            G = 4 * self.hidden_size
            dxn = np.empty((T, N, G), self.dtype)
            dr = np.empty((T, N, G), self.dtype) if self.norm != "none" else dxn
            self._work = ((T, N), self._forward_arrays(T, N), (dxn, dr))
        return self._work[1:]

    def _forward_arrays(self, T, N):
        """Fresh arrays for :func:`_kernels.lstm_forward` to write: h, c (T+1, N, H), r, gates
        (T, N, 4H), tanh_cn (T, N, H), and the statistics (mean, var (T, V, G), count (T, V))
        float64 of the recurrent term's and the cell's norm views."""
        H, G, dtype = self.hidden_size, 4 * self.hidden_size, self.dtype
        stats = []
        for F in (G, H):
            V, S = _kernels.statistics_shape(self._kind, N, F)
            stats.append((np.zeros((T, V, S)), np.zeros((T, V, S)), np.zeros((T, V))))
        return (np.empty((T + 1, N, H), dtype), np.empty((T + 1, N, H), dtype),
                np.empty((T, N, G), dtype), np.empty((T, N, G), dtype),
                np.empty((T, N, H), dtype), *stats)

    def _input_norm_forward(self, xw, training, mask):
        if "x" not in self.norms:                   # "none", or input_norm=False
            return xw
        if self.norm == "recurrent_batch":
            return self.norms["x"].forward(xw, training, mask=mask)
        return self.norms["x"].forward(xw, training)

    def _site_arrays(self, site):
        """(gamma, beta) of the h or c site as the kernel takes them."""
        if self.norm == "recurrent_batch":
            return self.norms[site].gamma, self.norms[site].beta
        if self.norm == "layer":
            return self.norms[site].params["gamma"], self.norms[site].params["beta"]
        return np.empty(0, self.dtype), np.empty(0, self.dtype)

    def _frozen(self, site):
        """(running_mean, running_var) of the h or c site (unused unless evaluating BN)."""
        if self.norm == "recurrent_batch":
            return self.norms[site].state["running_mean"], self.norms[site].state["running_var"]
        empty = np.zeros((1, 1), self.dtype)
        return empty, empty

    def _update_recurrent_stats(self, stats):
        """Running statistics of the h and c sites from the batch statistics of each step
        (stats_h, stats_c as the kernel wrote them: (T, 1, F) means and variances, (T, 1)
        counts of valid rows)."""
        for site, (mean, var, count) in zip(("h", "c"), stats):
            site_norm = self.norms[site]
            for key, value in site_norm.running_update(mean[:, 0], var[:, 0],
                                                       count[:, 0]).items():
                site_norm.state[key][...] = value

    # -- backward -----------------------------------------------------------------------------
    def backward(self, d_out) -> np.ndarray:
        """Gradient of the last forward: fills ``grads`` (and ``dh0``, ``dc0``), returns dL/dx."""
        if self._saved is None:
            raise RuntimeError("LSTM.backward() called before forward()")
        x, mask, batch_stats, saved = self._saved
        T, N, D = x.shape
        H = self.hidden_size
        if self.return_sequences:
            d_seq = self._check_array("d_out", d_out, (T, N, H))
            d_last = np.zeros((N, H), self.dtype)
        else:
            d_last = self._check_array("d_out", d_out, (N, H))
            d_seq = np.zeros((0, N, H), self.dtype)
        gamma_h = self._site_arrays("h")[0]
        gamma_c = self._site_arrays("c")[0]
        dxn, dr = self._workspace(T, N)[1]
        (dW_h, db, dgamma_h, dbeta_h, dgamma_c, dbeta_c, dh0,
         dc0) = _kernels.lstm_backward(d_seq, d_last, self.params["W_h"], mask, self._kind,
                                       batch_stats, gamma_h, gamma_c, self.eps, *saved, dxn, dr)
        dxw = self.norms["x"].backward(dxn) if "x" in self.norms else dxn
        dxw2 = dxw.reshape(T * N, 4 * H)
        self.grads["W_x"][...] = x.reshape(T * N, D).T @ dxw2
        self.grads["W_h"][...] = dW_h
        self.grads["b"][...] = db
        if self.norms:
            self.grads["gamma_h"][...] = dgamma_h
            self.grads["gamma_c"][...] = dgamma_c
            self.grads["beta_c"][...] = dbeta_c
            if "beta_h" in self.grads:
                self.grads["beta_h"][...] = dbeta_h
        self.dh0, self.dc0 = dh0, dc0
        return (dxw2 @ self.params["W_x"].T).reshape(T, N, D)

    # -- gradient flow ------------------------------------------------------------------------
    def hidden_gradients(self, x, d_last, *, h0=None, c0=None) -> np.ndarray:
        """dL/dh_t for every step of a training-mode forward of x (T, N, D), for a loss that
        depends on the sequence through the last state only, with ``d_last`` (N, H) = dL/dh_T.
        Returns (T + 1, N, H): row 0 is dL/dh0, row t + 1 the gradient reaching the output of
        step t (the total derivative through all later steps, batch statistics included; c_t
        held fixed), row T is ``d_last``. No mask: every sequence runs all T steps.

        In training mode the statistics of step s are those of the batch at step s, whatever
        came before, so the steps after t are exactly a run over x[t:] from the state
        (h_t, c_t): dL/dh_t is that run's dL/dh0. T such runs, O(T^2) steps in all. Parameters
        and running statistics are left as they were; the saved forward is dropped (call
        forward again before backward). ``h0`` defaults to 0, or the training noise."""
        x = self._check_x(x)
        T, N, D = x.shape
        H = self.hidden_size
        d_last = self._check_array("d_last", d_last, (N, H))
        h0 = np.zeros((N, H), self.dtype) if h0 is None else self._check_array("h0", h0, (N, H))
        c0 = np.zeros((N, H), self.dtype) if c0 is None else self._check_array("c0", c0, (N, H))
        if self.norm == "recurrent_batch":
            for site_norm in self.norms.values():
                site_norm.check_training(T, np.full(T, N), statistics_per_step=True)
        self._check_params()
        # -- nothing below refuses the call --
        if self.h0_noise_std > 0 and not h0.any():
            h0 = (self._rng.standard_normal((N, H)) * self.h0_noise_std).astype(self.dtype)
        saved_state = {site: (getattr(site_norm, "max_steps", None),
                              {key: value.copy() for key, value in site_norm.state.items()})
                       for site, site_norm in self.norms.items()}
        try:
            xw = (x.reshape(T * N, D) @ self.params["W_x"]).reshape(T, N, 4 * H)
            xn = self._input_norm_forward(xw, True, None)              # (T, N, 4H)
            mask = np.ones((T, N), np.bool_)
            h, c = self._run(xn, h0, c0, mask)[:2]                    # (T+1, N, H) each
            dh = np.empty((T + 1, N, H), self.dtype)
            dh[T] = d_last
            for t in range(T):
                saved = self._run(xn[t:], h[t], c[t], mask[t:])
                dh[t] = self._backward_kernel(d_last, mask[t:], saved)[6]
        finally:
            for site, (max_steps, state) in saved_state.items():
                site_norm = self.norms[site]
                for key, value in state.items():
                    if site_norm.state[key].shape == value.shape:
                        site_norm.state[key][...] = value
                    else:                              # grown by the input norm's forward
                        site_norm.state[key] = value
                if max_steps is not None:
                    site_norm.max_steps = max_steps
            self._saved = None
        return dh

    def _run(self, xn, h0, c0, mask):
        """The forward with batch statistics from (h0, c0) into fresh arrays; no state update.
        Returns the arrays the kernel wrote (:meth:`_forward_arrays`)."""
        T, N = mask.shape
        saved = self._forward_arrays(T, N)
        _kernels.lstm_forward(np.ascontiguousarray(xn), self.params["W_h"], self.params["b"],
                              np.ascontiguousarray(h0), np.ascontiguousarray(c0),
                              np.ascontiguousarray(mask), self._kind, True,
                              *self._site_arrays("h"), *self._site_arrays("c"),
                              self._frozen("h"), self._frozen("c"), self.eps, *saved)
        return saved

    def _backward_kernel(self, d_last, mask, saved):
        N, H = d_last.shape
        T = mask.shape[0]
        dxn = np.empty((T, N, 4 * H), self.dtype)
        dr = np.empty_like(dxn) if self.norm != "none" else dxn
        return _kernels.lstm_backward(np.zeros((0, N, H), self.dtype), d_last, self.params["W_h"],
                                      np.ascontiguousarray(mask), self._kind, True,
                                      self._site_arrays("h")[0], self._site_arrays("c")[0],
                                      self.eps, *saved, dxn, dr)

    def __repr__(self) -> str:
        extra = "" if self.input_norm else ", input_norm=False"
        return (f"LSTM({self.input_size}, {self.hidden_size}, norm={self.norm!r}{extra}, "
                f"return_sequences={self.return_sequences}, dtype={self.dtype.name})")


def _input_product(x2, W_x) -> np.ndarray:
    """x2 (M, D) @ W_x (D, 4H); for D = 1 as the outer product x2 * W_x[0] (the same products,
    several times faster than a matmul with an inner dimension of 1)."""
    if W_x.shape[0] == 1:
        return x2 * W_x[0]
    return x2 @ W_x


def _check_finite(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_nonnegative(name, value) -> float:
    value = _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value
