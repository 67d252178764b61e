"""torch.func transforms (grad, vjp, vmap) through the differentiable ops on the fused backends, against the
reference backend. The compiled backends' gradients are C++ autograd kernels (csrc/autograd.cpp) and their
vmap rules are in ddpm_kernels/extension.py."""

import importlib.util
import warnings

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import extension

T = 1000
S = dk.DiffusionSchedule("linear", timesteps=T)
PARAMS = ["eps", "x0", "v"]
LOSS_TYPES = ["l1", "l2"]
TOL = dict(rtol=1e-5, atol=1e-6)


def _triton_runs():
    if importlib.util.find_spec("triton") is None:
        return False
    if torch.cuda.is_available():
        return True
    from ddpm_kernels.triton import utils  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU

    return utils.INTERPRETED


def _backends():
    cases = []
    if extension.CPU_BACKEND.unavailable_reason("cpu", torch.float32) is None:
        cases.append(pytest.param("cpu", "cpu", id="cpu"))
    if torch.cuda.is_available() and extension.CUDA_BACKEND.unavailable_reason("cuda", torch.float32) is None:
        cases.append(pytest.param("cuda", "cuda", id="cuda"))
    if _triton_runs():
        cases.append(pytest.param("triton", "cuda" if torch.cuda.is_available() else "cpu", id="triton"))
    return cases


BACKENDS = _backends()
# The Triton ops are torch.library.custom_op with register_autograd, whose generated autograd.Function defines no
# setup_context: torch.func's grad and vjp refuse it (a torch limitation, fixed in later releases).
_TRITON_GRAD = pytest.mark.xfail(raises=RuntimeError, strict=False,
                                 reason="torch.library.register_autograd's autograd.Function has no setup_context")
GRAD_BACKENDS = [
    pytest.param(*b.values, id=b.id, marks=_TRITON_GRAD) if b.id == "triton" else b for b in BACKENDS
]


def _data(device, shape=(4, 3, 5, 7), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, 1, 500, T - 1])[: shape[0]].to(device)
    return t, [torch.randn(shape, generator=g).to(device) for _ in range(n)]


class _strict:
    """Checks that the fused backend serves the call: the compiled operators run (a silent fallback to the
    reference would pass any comparison), and functorch never takes its per-slice fallback (it warns)."""

    def __init__(self, backend):
        self.check = backend in ("cpu", "cuda")

    def __enter__(self):
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.filterwarnings("error", message=".*performance drop.*")
        self.profile = torch.autograd.profiler.profile()
        self.profile.__enter__()
        return self

    def __exit__(self, *exc):
        self.profile.__exit__(*exc)
        self.warnings.__exit__(*exc)
        if exc[0] is None and self.check:
            names = {e.name for e in self.profile.function_events}
            assert any(n.startswith("ddpm_kernels::") for n in names), sorted(names)[:20]
        return False


# --------------------------------------------------------------------------------------------------- grad / vjp
def _vjp_matches_reference(backend, make_f, primals, cotangents):
    """``torch.func.vjp`` of ``make_f(backend)`` runs the backend's kernels and gives the reference's outputs
    and vector-Jacobian product (``make_f(name)``: the function on that backend)."""
    results = []
    for be in (backend, "reference"):
        with _strict(be):
            out, vjp_fn = torch.func.vjp(make_f(be), *primals)
            results.append((out if isinstance(out, tuple) else (out,)) + vjp_fn(cotangents))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def _grad_matches_reference(backend, f, *args, argnums=0):
    """``torch.func.grad(f)(*args, backend)`` runs the backend's kernels and equals the reference's gradient."""
    with _strict(backend):
        got = torch.func.grad(f, argnums=argnums)(*args, backend)
    want = torch.func.grad(f, argnums=argnums)(*args, "reference")
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend,device", GRAD_BACKENDS)
def test_grad_q_sample(backend, device):
    t, (x, z, w) = _data(device)

    def f(x, z, backend):
        return (dk.q_sample(x, t, z, S, backend=backend) * w).sum()

    _grad_matches_reference(backend, f, x, z, argnums=(0, 1))


@pytest.mark.parametrize("backend,device", GRAD_BACKENDS)
def test_vjp_q_sample(backend, device):
    t, (x, z, cot) = _data(device)
    _vjp_matches_reference(backend, lambda be: lambda x, z: dk.q_sample(x, t, z, S, backend=be), (x, z), cot)


@pytest.mark.parametrize("backend,device", GRAD_BACKENDS)
def test_grad_of_grad_q_sample(backend, device):
    # q_sample_backward's own backward (q_sample again) under nested transforms
    t, (x, z, w) = _data(device)

    def inner(x, backend):
        return torch.func.grad(lambda x: (dk.q_sample(x, t, z, S, backend=backend) ** 2 * w).sum())(x)

    def outer(x, backend):
        return (inner(x, backend) * w).sum()

    _grad_matches_reference(backend, outer, x)


@pytest.mark.parametrize("backend,device", GRAD_BACKENDS)
@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_grad_and_vjp_diffusion_loss(backend, device, parameterization, loss_type, transform):
    t, (mo, x, z) = _data(device)
    if transform == "grad":
        def f(mo, backend):
            loss, simple, vlb = dk.diffusion_loss(mo, x, z, t, S, parameterization, loss_type, 0.8, 0.25,
                                                  backend=backend)
            return 2 * loss + 0.5 * simple + vlb  # every output's gradient reaches the kernel

        _grad_matches_reference(backend, f, mo)
        return
    cot = tuple(torch.tensor(v, device=device) for v in (1.5, -0.5, 0.0))
    _vjp_matches_reference(
        backend, lambda be: lambda m: dk.diffusion_loss(m, x, z, t, S, parameterization, loss_type, 1.0, 0.5,
                                                        backend=be), (mo,), cot)


# --------------------------------------------------------------------------------------------------------- vmap
V = 3
B = 4


def _slices(device, n=3, seed=0):
    """V slices of a batch: data (V, B, 3, 5) and the batch's t (B,)."""
    t, data = _data(device, shape=(V, B, 3, 5), n=n, seed=seed)
    return torch.tensor([0, 7, 400, T - 1], device=device), data


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("noise_batched", [True, False], ids=["batched_noise", "shared_noise"])
def test_vmap_q_sample(backend, device, noise_batched):
    t, (x, z) = _slices(device, n=2)
    zz = z if noise_batched else z[0]
    with _strict(backend):
        got = torch.func.vmap(lambda x, z: dk.q_sample(x, t, z, S, backend=backend),
                              in_dims=(0, 0 if noise_batched else None))(x, zz)
    want = torch.stack([dk.q_sample(x[v], t, zz[v] if noise_batched else zz, S, backend="reference")
                        for v in range(V)])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vmap_q_sample_on_a_later_dim(backend, device):
    # the vmapped dim need not be first: x (B, C, V, L), noise (B, C, L)
    t, (x, z) = _data(device, shape=(4, 3, V, 5), n=2)
    z = z[:, :, 0]
    with _strict(backend):
        got = torch.func.vmap(lambda x: dk.q_sample(x, t, z, S, backend=backend), in_dims=2, out_dims=2)(x)
    want = dk.q_sample(x, t, z.unsqueeze(2).expand_as(x).contiguous(), S, backend="reference")
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_vmap_diffusion_loss(backend, device, parameterization, loss_type):
    t, (mo, x, z) = _slices(device)

    def f(mo, x, backend):
        return dk.diffusion_loss(mo, x, z[0], t, S, parameterization, loss_type, 0.8, 0.25, backend=backend)

    with _strict(backend):
        got = torch.func.vmap(f, in_dims=(0, 0, None))(mo, x, backend)
    want = [f(mo[v], x[v], "reference") for v in range(V)]
    for k in range(3):  # each slice's loss is the mean over its own batch
        torch.testing.assert_close(got[k], torch.stack([w[k] for w in want]), **TOL)


# A vmapped t reaches the operators only directly: the public functions check t's values, which a vmapped
# tensor does not expose.
def _compiled():
    return [b for b in BACKENDS if b.values[0] in ("cpu", "cuda")]


@pytest.mark.parametrize("backend,device", _compiled())
def test_vmap_q_sample_operator_batched_t(backend, device):
    _, (x, z) = _slices(device, n=2)
    tt = torch.randint(0, T, (V, B), generator=torch.Generator().manual_seed(5)).to(device)
    table = S.table(torch.float32).to(device)
    with _strict(backend):
        got = torch.func.vmap(torch.ops.ddpm_kernels.q_sample, in_dims=(0, 0, 0, None))(x, tt, z, table)
    want = torch.stack([dk.q_sample(x[v], tt[v], z[v], S, backend="reference") for v in range(V)])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend,device", _compiled())
def test_vmap_diffusion_loss_operator_batched_t(backend, device):
    _, (mo, x, z) = _slices(device)
    tt = torch.randint(0, T, (V, B), generator=torch.Generator().manual_seed(6)).to(device)
    table = S.table(torch.float32).to(device)
    with _strict(backend):
        got = torch.func.vmap(torch.ops.ddpm_kernels.diffusion_loss,
                              in_dims=(0, 0, None, 0, None, None, None, None, None))(
            mo, x, z[0], tt, table, "v", "l1", 0.8, 0.25)
    for v in range(V):
        want = dk.diffusion_loss(mo[v], x[v], z[0], tt[v], S, "v", "l1", 0.8, 0.25, backend="reference")
        torch.testing.assert_close(tuple(g[v] for g in got), want, **TOL)


@pytest.mark.parametrize("backend,device", GRAD_BACKENDS)
def test_per_slice_gradients_vmap_of_grad(backend, device):
    # vmap(grad(...)): one gradient per slice of model_output, as a per-example-gradient loop would give
    t, (mo, x, z) = _slices(device)

    def f(mo, x, backend):
        x_t = dk.q_sample(x, t, z[0], S, backend=backend)
        return dk.diffusion_loss(mo * x_t, x, z[0], t, S, "v", "l2", 1.0, 0.5, backend=backend)[0]

    with _strict(backend):
        got = torch.func.vmap(torch.func.grad(f), in_dims=(0, 0, None))(mo, x, backend)
    want = torch.stack([torch.func.grad(f)(mo[v], x[v], "reference") for v in range(V)])
    torch.testing.assert_close(got, want, **TOL)


# ----------------------------------------------------------------------------------------------- the operators
def test_operator_refuses_gradients_it_does_not_compute():
    # Called directly (not through ddpm_kernels.diffusion_loss, which routes these to the reference), the
    # operator raises rather than leave x_start's gradient silently missing.
    t, (mo, x, z) = _data("cpu")
    x.requires_grad_()
    loss = torch.ops.ddpm_kernels.diffusion_loss(mo.requires_grad_(), x, z, t, S.table(torch.float32), "eps", "l2",
                                                 1.0, 0.0)[0]
    with pytest.raises(RuntimeError, match="model_output only"):
        loss.backward()
    (g,) = torch.autograd.grad(
        torch.ops.ddpm_kernels.diffusion_loss(mo, x, z, t, S.table(torch.float32), "eps", "l2", 1.0, 0.0)[0], mo
    )
    assert g.shape == mo.shape


def test_forward_mode_ad_is_refused():
    t, (x, z, tangent) = _data("cpu")
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda x: torch.ops.ddpm_kernels.q_sample(x, t, z, S.table(torch.float32)), (x,), (tangent,))
