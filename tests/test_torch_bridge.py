"""normkit.torch: the norms as torch modules, against torch's own modules, gradcheck, repeated use,
checkpointing, state dicts, masks, bad inputs and the thread policy."""
from __future__ import annotations

import subprocess
import sys

import numba
import numpy as np
import pytest

import normkit

torch = pytest.importorskip("torch")
nkt = pytest.importorskip("normkit.torch")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
DTYPES = [torch.float32, torch.float64]


def test_importing_normkit_does_not_import_torch():
    code = ("import sys, normkit, normkit.nn, normkit.train; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "import normkit.torch; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)


# -- every registered norm: gradcheck, and the same numbers as the NumPy interface -------------

#: name -> (num_features, options, input shape, mask shape or None); a name not here (a norm
#: registered later) gets the generic case.
CASES = {
    "batch": (3, dict(), (6, 3, 4), (6, 4)),
    "ghost": (3, dict(virtual_batch_size=3), (6, 3, 4), (6, 4)),
    "renorm": (3, dict(), (6, 3, 4), (6, 4)),
    "group": (6, dict(num_groups=3), (4, 6, 5), None),
    "instance": (3, dict(), (4, 3, 5), None),
    "layer": (3, dict(), (4, 5, 3), None),
    "rms": (3, dict(), (4, 5, 3), None),
    "none": (3, dict(), (4, 3, 2), None),
    "recurrent_batch": (3, dict(max_steps=4), (4, 5, 3), (4, 5)),
}
GENERIC = (3, dict(), (6, 3, 4), None)


def _case(name):
    num_features, options, shape, mask_shape = CASES.get(name, GENERIC)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal(shape) * 2 + 0.5)
    mask = None
    if mask_shape is not None:
        mask = torch.from_numpy(rng.random(mask_shape) < 0.75)
        mask.view(-1)[:3] = True
    return num_features, options, x, mask


def _with_masks():
    for name in normkit.available():
        yield pytest.param(name, False, id=name)
        if CASES.get(name, GENERIC)[3] is not None:
            yield pytest.param(name, True, id=f"{name}-masked")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,masked", list(_with_masks()))
def test_gradcheck_every_norm(name, masked, training):
    num_features, options, x, mask = _case(name)
    module = nkt.make(name, num_features, dtype=torch.float64, **options).train(training)
    if name == "renorm":
        # r and d carry no gradient: exact only where clipping holds them constant, so set the
        # running statistics far from the batch's (r = 1/r_max, d = +-d_max) and freeze them.
        module.norm.momentum = 0.0
        with torch.no_grad():
            module.running_var.fill_(1e4)
            module.running_mean.copy_(torch.tensor([-1000.0, 1000.0, -1000.0]))
    _randomize(module)
    x.requires_grad_(True)
    params = tuple(module.parameters())
    fn = lambda x, *params: module(x, mask=mask if masked else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", normkit.available())
def test_every_norm_matches_the_numpy_interface_over_steps(name):
    """Output, dL/dx, parameter gradients and state equal normkit's own Norm, step after step,
    training then evaluation (the bridge adds no arithmetic of its own)."""
    num_features, options, x, mask = _case(name)
    module = nkt.make(name, num_features, dtype=torch.float64, **options)
    norm = normkit.make(name, num_features, dtype=np.float64, **options)
    _randomize(module)
    names = {key: nkt._TORCH_NAMES.get(key, key) for key in norm.params}   # gamma -> weight...
    assert sorted(names.values()) == sorted(n for n, _ in module.named_parameters())
    for key, torch_key in names.items():
        norm.params[key][...] = getattr(module, torch_key).detach().numpy()
    rng = np.random.default_rng(1)
    for step, training in enumerate([True, True, True, False]):
        xs = torch.from_numpy(x.numpy() * (1 + step) + step).requires_grad_(True)
        dy = rng.standard_normal(x.shape)
        module.train(training)
        module.zero_grad()
        y = module(xs, mask=mask)
        y.backward(torch.from_numpy(dy))
        kwargs = {} if mask is None else {"mask": mask.numpy()}
        np.testing.assert_array_equal(y.detach().numpy(), norm.forward(xs.detach().numpy(),
                                                                        training, **kwargs))
        np.testing.assert_array_equal(xs.grad.numpy(), norm.backward(dy))
        for key, torch_key in names.items():
            np.testing.assert_array_equal(getattr(module, torch_key).grad.numpy(),
                                          norm.grads[key], err_msg=key)
        for key, value in norm.state.items():
            np.testing.assert_array_equal(getattr(module, key).numpy(), value, err_msg=key)


# -- torch's own modules ---------------------------------------------------------------------

TORCH_PAIRS = {
    "BatchNorm1d-2d": (lambda: nkt.BatchNorm1d(5), lambda: torch.nn.BatchNorm1d(5), (8, 5)),
    "BatchNorm1d-3d": (lambda: nkt.BatchNorm1d(5), lambda: torch.nn.BatchNorm1d(5), (8, 5, 7)),
    "BatchNorm2d": (lambda: nkt.BatchNorm2d(5, momentum=0.3), lambda: torch.nn.BatchNorm2d(5, momentum=0.3),
                    (4, 5, 6, 7)),
    "BatchNorm2d-cumulative": (lambda: nkt.BatchNorm2d(5, momentum=None),
                               lambda: torch.nn.BatchNorm2d(5, momentum=None), (4, 5, 3, 3)),
    "BatchNorm2d-no-stats": (lambda: nkt.BatchNorm2d(5, track_running_stats=False),
                             lambda: torch.nn.BatchNorm2d(5, track_running_stats=False),
                             (4, 5, 3, 3)),
    "BatchNorm2d-no-affine": (lambda: nkt.BatchNorm2d(5, affine=False),
                              lambda: torch.nn.BatchNorm2d(5, affine=False), (4, 5, 3, 3)),
    "BatchNorm3d": (lambda: nkt.BatchNorm3d(4, eps=1e-3), lambda: torch.nn.BatchNorm3d(4, eps=1e-3),
                    (3, 4, 2, 3, 5)),
    "LayerNorm": (lambda: nkt.LayerNorm((5, 6)), lambda: torch.nn.LayerNorm((5, 6)), (4, 3, 5, 6)),
    "LayerNorm-no-affine": (lambda: nkt.LayerNorm(6, elementwise_affine=False),
                            lambda: torch.nn.LayerNorm(6, elementwise_affine=False), (4, 6)),
    "GroupNorm": (lambda: nkt.GroupNorm(3, 6), lambda: torch.nn.GroupNorm(3, 6), (4, 6, 5, 5)),
    "InstanceNorm1d": (lambda: nkt.InstanceNorm1d(5), lambda: torch.nn.InstanceNorm1d(5), (4, 5, 9)),
    "InstanceNorm2d-affine": (lambda: nkt.InstanceNorm2d(5, affine=True),
                              lambda: torch.nn.InstanceNorm2d(5, affine=True), (4, 5, 3, 4)),
    "RMSNorm": (lambda: nkt.RMSNorm(6, eps=1e-5), lambda: torch.nn.RMSNorm(6, eps=1e-5), (4, 3, 6)),
    "RMSNorm-eps-None": (lambda: nkt.RMSNorm([2, 6]), lambda: torch.nn.RMSNorm([2, 6]), (4, 2, 6)),
}


def _pair(case, dtype):
    make_ours, make_theirs, shape = TORCH_PAIRS[case]
    ours, theirs = make_ours().to(dtype), make_theirs().to(dtype)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(TORCH_PAIRS))
def test_matches_torch_modules_over_training_steps(case, dtype):
    """Four SGD steps in training, then evaluation: outputs, dL/dx, parameter gradients, updated
    parameters and running statistics equal torch's module's."""
    ours, theirs, shape = _pair(case, dtype)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1) if list(ours.parameters()) else None
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1) if opt_ours else None
    g = torch.Generator().manual_seed(1)
    for step, training in enumerate([True] * 4 + [False]):
        x = torch.randn(shape, generator=g, dtype=dtype) * (1 + step) + 3.0 * step
        dy = torch.randn(shape, generator=g, dtype=dtype)
        results = []
        for module, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            module.train(training)
            xr = x.clone().requires_grad_(True)
            y = module(xr)
            y.backward(dy)
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            if opt:
                opt.step()
                opt.zero_grad()
            results.append((y.detach(), xr.grad, grads, module.state_dict()))
        (y1, dx1, g1, s1), (y2, dx2, g2, s2) = results
        _close(y1, y2, dtype, f"y, step {step}")
        _close(dx1, dx2, dtype, f"dx, step {step}")
        assert g1.keys() == g2.keys()
        for key in g1:
            _close(g1[key], g2[key], dtype, f"d{key}, step {step}")
        assert s1.keys() == s2.keys()
        for key in s1:
            _close(s1[key], s2[key], dtype, f"{key}, step {step}")


def _close(got, want, dtype, what):
    """Equal to rtol 1e-5 (float32) or 1e-10 (float64) relative to the largest element: a
    parameter gradient is a sum over the batch, and torch accumulates float32 sums in float32
    (normkit in float64), so an element that cancels to near 0 differs by ~1e-6 absolute."""
    rtol = TOL[dtype]["rtol"]
    scale = want.abs().max().item() if want.is_floating_point() and want.numel() else 0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-3),
                               msg=lambda m: f"{what}: {m}")


def test_module_used_twice_in_one_step_sums_both_gradients():
    """Siamese use: torch's BatchNorm2d applied to two inputs in one graph is the reference (the
    bug of a wrapper keeping only the last forward's saved values)."""
    ours, theirs, _ = _pair("BatchNorm2d", torch.float64)
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64) * s + s for s in (1, 3))
    grads = []
    for module in (ours, theirs):
        ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        ya, yb = module(ar), module(br)
        (ya * yb.exp()).sum().backward()       # each use's gradient depends on the other's output
        grads.append((ar.grad, br.grad, module.weight.grad, module.bias.grad,
                      module.running_mean.clone(), module.running_var.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_gives_the_gradients_of_the_plain_graph(use_reentrant):
    """Under torch.utils.checkpoint the forward runs again in backward: the gradients equal the
    uncheckpointed ones, and the running statistics are updated twice, as torch's BatchNorm's."""
    from torch.utils.checkpoint import checkpoint
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = {}
    for label in ("ours", "theirs", "ours-plain"):
        ours, theirs, _ = _pair("BatchNorm2d", torch.float64)
        module = theirs if label == "theirs" else ours
        block = torch.nn.Sequential(torch.nn.Tanh(), module, torch.nn.Softplus())
        xr = x.clone().requires_grad_(True)
        y = block(xr) if label.endswith("plain") else checkpoint(block, xr,
                                                                 use_reentrant=use_reentrant)
        (y ** 2).sum().backward()
        results[label] = (xr.grad, module.weight.grad, module.bias.grad, module.running_mean.clone(),
                          module.running_var.clone(), module.num_batches_tracked.clone())
    for got, want in zip(results["ours"], results["theirs"]):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    for got, want in zip(results["ours"][:3], results["ours-plain"][:3]):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert results["ours"][5].item() == 2 and results["ours-plain"][5].item() == 1


@pytest.mark.parametrize("case", ["BatchNorm2d", "LayerNorm", "GroupNorm"])
def test_load_state_dict_both_ways(case):
    _, make_theirs, shape = TORCH_PAIRS[case]
    theirs = make_theirs()
    _randomize(theirs)
    with torch.no_grad():                      # trained running statistics
        for _ in range(3):
            theirs(torch.randn(shape) * 2 + 1)
    ours = TORCH_PAIRS[case][0]()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys, shapes
    back = make_theirs()
    back.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    for module in (ours, theirs, back):
        module.eval()
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    torch.testing.assert_close(back(x), theirs(x), rtol=0, atol=0)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_double_converts_the_module():
    ours, theirs, shape = _pair("BatchNorm2d", torch.float32)
    ours.double()
    theirs.double()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float64])
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL[torch.float64])
    assert ours.running_var.dtype == torch.float64


# -- masked batch norm -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_masked_batch_norm_is_batch_norm_over_the_valid_positions(dtype):
    """(N, C, L) with a (N, L) mask against torch's BatchNorm1d on the valid positions gathered
    into (M, C): outputs, gradients, running statistics; padded positions give 0 and get 0."""
    N, C, L = 5, 4, 7
    ours = nkt.make("batch", C, dtype=dtype, momentum=0.2)
    theirs = torch.nn.BatchNorm1d(C, momentum=0.2, dtype=dtype)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        x = torch.randn(N, C, L, generator=g, dtype=dtype) * 2 + step
        mask = torch.rand(N, L, generator=g) < 0.6
        mask[0, :2] = True
        x[~mask.unsqueeze(1).expand(N, C, L)] = float("nan")     # padding holds anything
        dy = torch.randn(N, C, L, generator=g, dtype=dtype)
        xr = x.clone().requires_grad_(True)
        y = ours(xr, mask=mask)
        y.backward(dy)
        valid = x.transpose(1, 2)[mask].clone().requires_grad_(True)          # (M, C)
        yt = theirs(valid)
        yt.backward(dy.transpose(1, 2)[mask])
        tol = TOL[dtype]
        torch.testing.assert_close(y.transpose(1, 2)[mask], yt, **tol)
        torch.testing.assert_close(xr.grad.transpose(1, 2)[mask], valid.grad, **tol)
        assert (y.transpose(1, 2)[~mask] == 0).all() and (xr.grad.transpose(1, 2)[~mask] == 0).all()
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), **tol)
        ours.zero_grad()
        theirs.zero_grad()


def test_recurrent_batch_norm_keeps_statistics_per_step():
    """recurrent_batch: step t normalized by its own batch statistics (torch's batch_norm per step)
    and a running mean per step."""
    T, N, F = 3, 6, 4
    module = nkt.make("recurrent_batch", F, max_steps=T, dtype=torch.float64)
    x = torch.randn(T, N, F, dtype=torch.float64) * torch.arange(1, T + 1).view(T, 1, 1)
    y = module(x)
    rm = torch.zeros(F, dtype=torch.float64)
    for t in range(T):
        rv = torch.ones(F, dtype=torch.float64)
        want = torch.nn.functional.batch_norm(x[t], rm.clone(), rv, training=True, momentum=0.1)
        torch.testing.assert_close(y[t], want, **TOL[torch.float64])
        torch.testing.assert_close(module.running_mean[t], 0.1 * x[t].mean(0), **TOL[torch.float64])


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,fragment", [
    (torch.ones(4, 3, 2, dtype=torch.int64), "torch.int64"),
    (torch.ones(4, 3, 2, dtype=torch.float16), "torch.float16"),
    (torch.ones(4, 3, 2, dtype=torch.bfloat16), "torch.bfloat16"),
    (torch.ones(4, 3, 2, device="meta"), "device meta"),
], ids=["int64", "float16", "bfloat16", "meta-device"])
def test_unsupported_tensors_are_refused_naming_what_is_supported(bad, fragment):
    module = nkt.BatchNorm1d(3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(TypeError) as info:
        module(bad)
    assert fragment in str(info.value) and "torch.float32 or torch.float64" in str(info.value)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])


def test_other_bad_calls_raise_clearly_and_change_nothing():
    module = nkt.BatchNorm1d(3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(TypeError, match="x has dtype torch.float64 but this module"):
        module(torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(torch.ones(1, 3))
    with pytest.raises(ValueError, match="expects 2 or 3-D input"):
        module(torch.ones(2, 3, 4, 5))
    with pytest.raises(TypeError, match="mask must be a CPU torch.bool tensor"):
        module(torch.ones(4, 3, 2), mask=torch.ones(4, 2))
    with pytest.raises(TypeError, match="takes no mask"):
        nkt.LayerNorm(3)(torch.ones(4, 3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown normalizer"):
        nkt.make("batchnorm", 3)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- threads ---------------------------------------------------------------------------------

def test_kernels_run_with_the_thread_policy_and_restore_numba_threads(monkeypatch):
    module = nkt.BatchNorm1d(3)
    seen = []
    norm = module.norm
    original = norm.forward_saved

    def spy(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return original(*args, **kwargs)
    monkeypatch.setattr(norm, "forward_saved", spy)
    x = torch.randn(8, 3)
    outside = numba.get_num_threads()
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        module(x)
        nkt.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        module(x)
    finally:
        nkt.set_num_threads(None)
        torch.set_num_threads(torch_threads)
    assert seen == [1, numba.config.NUMBA_NUM_THREADS]
    assert numba.get_num_threads() == outside
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"):
        nkt.set_num_threads(0)


def test_strided_inputs_and_a_deep_copy():
    """channels_last and transposed (non-contiguous) inputs give torch's results; a deep copy of
    the module runs on its own tensors."""
    import copy
    ours, theirs, shape = _pair("BatchNorm2d", torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    for xs in (x.contiguous(memory_format=torch.channels_last),
               x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert not xs.is_contiguous()
        a, b = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
        ya, yb = ours(a), theirs(b)
        torch.testing.assert_close(ya, yb, **TOL[torch.float64])
        ya.backward(torch.ones_like(ya) + x)
        yb.backward(torch.ones_like(yb) + x)
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])
    twin = copy.deepcopy(ours)
    twin(x * 3 + 1)
    assert not torch.equal(twin.running_mean, ours.running_mean)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL[torch.float64])


@pytest.mark.parametrize("case", ["BatchNorm2d", "GroupNorm", "InstanceNorm2d-affine", "BatchNorm3d"])
def test_channels_last_runs_in_place_and_comes_back_channels_last(case, monkeypatch):
    """A channels_last input reaches the kernels without a copy (the axis=-1 view of its memory)
    and gives torch's output (channels_last too), gradients and running statistics."""
    ours, theirs, shape = _pair(case, torch.float64)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).contiguous(memory_format=fmt)
    seen = []
    original = normkit.Norm.forward_saved

    def spy(self, x_array, *args, **kwargs):
        seen.append((self.axis, x_array))
        return original(self, x_array, *args, **kwargs)
    monkeypatch.setattr(normkit.Norm, "forward_saved", spy)
    for step in range(2):
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        assert a.is_contiguous(memory_format=fmt)
        seen.clear()
        ya, yb = ours(a), theirs(b)
        [(axis, array)] = seen
        assert axis == -1 and np.shares_memory(array, a.detach().numpy())     # no copy
        assert ya.is_contiguous(memory_format=fmt)
        dy = torch.randn_like(yb)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, **TOL[torch.float64])
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, **TOL[torch.float64])


def test_channels_last_masked_batch_norm_and_settings_follow_module_norm():
    """Masks work in the channels-last path, and renorm's r_max set on module.norm reaches it."""
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 1
    mask = torch.rand(4, 5, 6) < 0.7
    for name in ("batch", "renorm"):
        first, last = (nkt.make(name, 3, dtype=torch.float64) for _ in range(2))
        for module in (first, last):
            if name == "renorm":
                module.norm.r_max = 1.0
                module.norm.d_max = 0.0
            module(x * 0.5)                    # running statistics away from the start
        y_first = first(x, mask=mask)
        y_last = last(x.contiguous(memory_format=torch.channels_last), mask=mask)
        torch.testing.assert_close(y_last, y_first, **TOL[torch.float64])
        torch.testing.assert_close(last.running_var, first.running_var, **TOL[torch.float64])
    plain = nkt.make("batch", 3, dtype=torch.float64)
    plain(x * 0.5)
    torch.testing.assert_close(y_last, plain(x, mask=mask), **TOL[torch.float64])  # r=1, d=0


def test_a_module_converted_to_an_unsupported_dtype_or_device_is_refused():
    module = nkt.BatchNorm1d(3).half()
    with pytest.raises(TypeError, match="parameters and buffers are torch.float16"):
        module(torch.ones(4, 3))
    module = nkt.BatchNorm1d(3).to("meta")
    with pytest.raises(TypeError, match="device meta"):
        module(torch.ones(4, 3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(TORCH_PAIRS))
def test_gradcheck_torch_named_modules(case, training):
    ours, theirs, shape = _pair(case, torch.float64)
    ours.train(True)(torch.randn(shape, dtype=torch.float64) * 2 + 1)    # running statistics
    ours.train(training)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    params = tuple(ours.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: ours(x), (x, *params), eps=1e-6, atol=1e-7,
                                    rtol=1e-6)
