"""normkit.torch.LSTM: the torch module around normkit.nn.LSTM against the torch-autograd
LSTMCell-style oracle of test_lstm.py, torch.nn.LSTM (gate order and layout), gradcheck,
batch_first, repeated use in one step (the replay), checkpointing and the thread policy."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nkt = pytest.importorskip("normkit.torch")

from test_lstm import TOL64, TorchLSTM, _inputs, _mask  # noqa: E402

NORMS = ["none", "recurrent_batch", "layer"]
D, H = 3, 4


def _module(norm, T, **kwargs):
    """A float64 module with random, non-trivial parameters (as test_lstm's _lstm)."""
    module = nkt.LSTM(D, H, norm=norm, max_steps=T, dtype=torch.float64, seed=0, **kwargs)
    rng = np.random.default_rng(100)
    with torch.no_grad():
        for key, p in module.named_parameters():
            if key.startswith("gamma"):
                p.copy_(torch.from_numpy(rng.uniform(0.1, 0.6, p.shape)))
            else:
                p.copy_(torch.from_numpy(rng.standard_normal(p.shape)
                                         * (0.5 if key.startswith("W") else 0.3)))
    return module


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("norm", NORMS)
def test_matches_the_torch_lstm_cell_oracle(norm, masked):
    """Output, dL/dx, dL/dh0, dL/dc0, every parameter gradient and the running statistics over
    two training steps with an SGD update between them, then evaluation."""
    T, N = 6, 5
    module = _module(norm, T)
    oracle = TorchLSTM(module.lstm)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    rng = np.random.default_rng(2)
    for step, training in enumerate([True, True, False]):
        x, h0, c0 = _inputs(T, N, seed=10 + step)
        mask = _mask(T, N) if masked else None
        p = {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}
        xt, h0t, c0t = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
        seq_t, _ = oracle.forward(xt, mask, h0t, c0t, p, training)
        d_out = torch.from_numpy(rng.standard_normal(seq_t.shape))
        (seq_t * d_out).sum().backward()

        module.train(training)
        xs, h0s, c0s = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
        out = module(xs, mask=None if mask is None else torch.from_numpy(mask), h0=h0s, c0=c0s)
        out.backward(d_out)
        for got, want, what in ((out, seq_t, "out"), (xs.grad, xt.grad, "dx"),
                                (h0s.grad, h0t.grad, "dh0"), (c0s.grad, c0t.grad, "dc0")):
            np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), **TOL64,
                                       err_msg=f"{norm} step {step}: {what}")
        for key, value in module.named_parameters():
            np.testing.assert_allclose(value.grad.numpy(), p[key].grad.numpy(), **TOL64,
                                       err_msg=f"{norm} step {step}: d{key}")
        for key, value in oracle.running_state().items():
            np.testing.assert_allclose(getattr(module, key).numpy(), value, **TOL64, err_msg=key)
        opt.step()                             # in place, into the normkit layer's arrays
        opt.zero_grad()
        for key, value in module.named_parameters():
            assert np.shares_memory(value.detach().numpy(), module.lstm.params[key])


def test_gate_order_and_layout_against_torch_nn_lstm():
    """norm="none" is torch.nn.LSTM after torch_lstm_state_dict (gates f, i, o, g -> i, f, g, o;
    W_x (D, 4H) -> weight_ih (4H, D)): outputs and all gradients."""
    T, N = 5, 3
    module = _module("none", T)
    reference = torch.nn.LSTM(D, H, dtype=torch.float64)
    reference.load_state_dict(module.torch_lstm_state_dict())
    x = torch.randn(T, N, D, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = module(xa)
    yb, _ = reference(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    grads = module.torch_lstm_state_dict()
    for key in ("W_x", "W_h", "b"):            # gradients map the same way as the weights
        getattr(module, key).data = getattr(module, key).grad
    converted = module.torch_lstm_state_dict()
    torch.testing.assert_close(converted["weight_ih_l0"], reference.weight_ih_l0.grad)
    torch.testing.assert_close(converted["weight_hh_l0"], reference.weight_hh_l0.grad)
    torch.testing.assert_close(converted["bias_ih_l0"], reference.bias_ih_l0.grad)
    assert grads.keys() == converted.keys()


def test_batch_first_and_lengths():
    T, N = 5, 4
    time_major = _module("recurrent_batch", T)
    batch_first = _module("recurrent_batch", T, batch_first=True)
    x = torch.randn(T, N, D, dtype=torch.float64)
    lengths = torch.tensor([5, 5, 3, 2])
    a = time_major(x, lengths=lengths)
    b = batch_first(x.transpose(0, 1).contiguous(), lengths=lengths)
    torch.testing.assert_close(b, a.transpose(0, 1), rtol=0, atol=0)
    assert (a[3:, 3] == 0).all()               # padded steps output 0
    mask = torch.arange(T)[None, :] < lengths[:, None]           # (N, T), batch first
    c = batch_first(x.transpose(0, 1).contiguous(), mask=mask)
    torch.testing.assert_close(c, b)
    last = nkt.LSTM(D, H, norm="layer", return_sequences=False)
    assert last(torch.randn(T, N, D)).shape == (N, H)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(norm, training):
    """gradcheck calls the module many times before the backward of its first call: that
    backward replays the call (and, in evaluation, its running statistics)."""
    T, N = 3, 4
    module = _module(norm, T).train(training)
    if norm == "recurrent_batch":              # non-trivial running statistics for evaluation
        module.train(True)(torch.randn(T, N, D, dtype=torch.float64) * 2 + 1)
        module.train(training)
    x, h0, c0 = (torch.tensor(a, requires_grad=True) for a in _inputs(T, N))
    params = tuple(module.parameters())
    fn = lambda x, h0, c0, *params: module(x, h0=h0, c0=c0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("modes", [(True, True), (False, False), (False, True)],
                         ids=["train-train", "eval-eval", "eval-train"])
def test_module_used_twice_in_one_step_sums_both_gradients(modes):
    """Two calls, then one backward through both: the gradients of each call computed alone
    (forward, backward, forward, backward), summed; running statistics as after two calls.
    eval-train: the replay of the evaluation call uses the running statistics of its time."""
    T, N = 4, 5
    rng = np.random.default_rng(5)
    x1, x2 = (torch.from_numpy(rng.standard_normal((T, N, D)) * s) for s in (1, 2))
    g1, g2 = (torch.from_numpy(rng.standard_normal((T, N, H))) for _ in range(2))
    results = []
    for together in (True, False):
        module = _module("recurrent_batch", T)
        module.train(True)(x1 * 3)             # running statistics for evaluation
        a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        if together:
            ya, yb = module.train(modes[0])(a), module.train(modes[1])(b)
            ((ya * g1).sum() + (yb * g2).sum()).backward()
        else:
            (module.train(modes[0])(a) * g1).sum().backward()
            (module.train(modes[1])(b) * g2).sum().backward()
        results.append((a.grad, b.grad, *(p.grad for p in module.parameters()),
                        *(v.clone() for v in module.buffers())))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_checkpoint_gives_the_gradients_of_the_plain_graph():
    from torch.utils.checkpoint import checkpoint
    T, N = 4, 5
    x = torch.randn(T, N, D, dtype=torch.float64)
    results = []
    for use_checkpoint in (True, False):
        module = _module("layer", T)
        xr = x.clone().requires_grad_(True)
        y = checkpoint(module, xr, use_reentrant=False) if use_checkpoint else module(xr)
        (y ** 2).sum().backward()
        results.append((xr.grad, *(p.grad for p in module.parameters())))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_call_with_random_h0_cannot_be_replayed_and_says_so():
    module = _module("recurrent_batch", 4, h0_noise_std=0.1)
    x1, x2 = (torch.randn(4, 3, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y1 = module(x1)
    y2 = module(x2)
    with pytest.raises(RuntimeError, match="random h0"):
        (y1.sum() + y2.sum()).backward()
    y1 = module(x1)                            # call, backward, call, backward: fine
    y1.sum().backward()
    y2 = module(x2)
    y2.sum().backward()
    assert x1.grad is not None and x2.grad is not None


def test_bad_input_is_refused_clearly():
    module = nkt.LSTM(D, H)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        module(torch.ones(2, 2, D, dtype=torch.float16))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but this LSTM holds float32"):
        module(torch.ones(2, 2, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="input_size=3"):
        module(torch.ones(2, 2, D + 1))


@pytest.mark.parametrize("fixed", [None, 2])
def test_lstm_calls_run_numba_and_blas_single_threaded_unless_fixed(monkeypatch, fixed):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numba
    if fixed is not None and fixed > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("needs 2 Numba threads")
    module = nkt.LSTM(D, H)
    seen = []
    original = module.lstm.forward

    def spy(*args, **kwargs):
        blas = [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]
        seen.append((numba.get_num_threads(), set(blas)))
        return original(*args, **kwargs)
    monkeypatch.setattr(module.lstm, "forward", spy)
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    numba_before = numba.get_num_threads()
    try:
        nkt.set_num_threads(fixed)
        module(torch.randn(3, 2, D))
    finally:
        nkt.set_num_threads(None)
    want = 1 if fixed is None else fixed
    assert seen == [(want, {want})]
    after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert after[:len(before)] == before and numba.get_num_threads() == numba_before
