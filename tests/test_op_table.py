"""The op table (ddpm_kernels/_spec.py) is the one declaration of every op: the public functions, the reference,
the compiled operators' schemas and the backends all agree with it (docs/design.md, "The op table")."""

import inspect

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import _native, backends, reference
from ddpm_kernels._spec import OPS, StepOptions

needs_library = pytest.mark.skipif(_native.schema_lib is None, reason="needs the compiled library")


def test_every_op_is_public_and_has_a_reference():
    assert set(OPS) == set(reference.OPS)
    for name, spec in OPS.items():
        fn = getattr(dk, name)
        params = inspect.signature(fn).parameters
        for tensor in spec.tensors:
            assert tensor in params, (name, tensor)
        for option in spec.options:
            assert params[option.name].default == option.default, (name, option.name)
        assert ("out" in params) == spec.has_out, name
        assert ("generator" in params) == spec.draws_noise, name
        if spec.draws_noise:
            assert params["sample_offset"].kind == inspect.Parameter.KEYWORD_ONLY, name
            assert params["sample_offset"].default == 0, name
            if spec.schema:  # the compiled schema takes it right after the generator
                assert "Generator? generator, int sample_offset" in spec.schema, name
        else:
            assert "sample_offset" not in params, name


def _returns(kinds):
    if not kinds:
        return "()"
    return "Tensor" if len(kinds) == 1 else "(" + ", ".join("Tensor" for _ in kinds) + ")"


@needs_library
@pytest.mark.parametrize("name", [n for n, s in OPS.items() if s.schema])
def test_registered_schemas_match_the_table(name):
    spec = OPS[name]
    assert str(getattr(torch.ops.ddpm_kernels, name).default._schema) == "ddpm_kernels::" + spec.schema
    signature, returns = spec.schema.split(" -> ")
    assert returns == _returns(spec.outputs)
    if spec.has_out:
        expected = f"ddpm_kernels::{signature[:-1].replace(name + '(', name + '_out(', 1)}, Tensor(a!) out) -> "
        expected += _returns(spec.outputs[1:])
        assert str(getattr(torch.ops.ddpm_kernels, name + "_out").default._schema) == expected


@needs_library
@pytest.mark.parametrize("name", [n for n, s in OPS.items() if s.schema])
def test_generated_fakes_shape_every_output(name):
    """The fake kernels generated from the table give the kernels' output shapes, dtypes and formats."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ddpm_kernels.extension  # noqa: F401  (registers the fakes)

    spec = OPS[name]
    s = dk.DiffusionSchedule("linear", 10)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
        args = {tensor: x for tensor in spec.like + spec.optional + (spec.data,)}
        index = mode.from_tensor(torch.zeros(2, dtype=torch.int64))
        args.update(t=index, t_prev=index, step_index=index)
        args.update(table=mode.from_tensor(s.table()), table64=mode.from_tensor(s.table(torch.float64)))
        # the flow-matching family: per-sample sigma operands (period 1)
        args.update({n: mode.from_tensor(torch.full((2,), 0.5)) for n in spec.sigmas})
        # the multistep-solver family: a coefficient table without history columns and a step per sample
        args.update(coefficients=mode.from_tensor(torch.zeros(3, 11, dtype=torch.float64)),
                    step_index=mode.from_tensor(torch.zeros(2, dtype=torch.int64)))
        schema = getattr(torch.ops.ddpm_kernels, name).default._schema
        defaults = {"str": "eps", "bool": True, "float": 0.5, "int": 1}
        call = []
        for a in schema.arguments:
            if a.name in args:
                call.append(args[a.name])
            elif a.name == "variance_type":
                call.append("fixed_small")
            elif a.name == "loss_type":
                call.append("l2")
            elif a.name == "weighting":
                call.append("none")
            elif str(a.type).endswith("?") or str(a.type).startswith("Optional"):
                call.append(None)
            else:
                call.append(defaults[str(a.type)])
        results = getattr(torch.ops.ddpm_kernels, name)(*call)
    results = results if isinstance(results, tuple) else (results,)
    assert len(results) == len(spec.outputs)
    for kind, r in zip(spec.outputs, results):
        if kind in ("like", "pred_x0"):
            assert r.shape == x.shape and r.dtype == x.dtype and r.stride() == x.stride()
        elif kind == "per_sample":
            assert r.shape == (2, 1, 1, 1) and r.dtype == torch.float32
        else:
            assert r.shape == () and r.dtype == x.dtype


def test_step_options_are_hashable_and_canonical():
    s = dk.DiffusionSchedule("linear", 10)
    x, t, tp = torch.randn(2, 3), torch.tensor([5, 3]), torch.tensor([4, -1])
    a = dk.ddim_step(x, t, tp, x, s, 0.0, "epsilon", backend="reference")
    b = dk.reference.sampler_step_ref(x, t, tp, x, s, StepOptions("ddim", "eps", clip_denoised=False))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert hash(StepOptions("ddpm")) == hash(StepOptions("ddpm"))
    assert StepOptions("ddpm").adds_noise and not StepOptions("ddim").adds_noise
    assert StepOptions("ddpm", variance_type="learned").learned and not StepOptions("ddim").learned


def test_dispatch_is_the_only_fallback(monkeypatch):
    """No fused backend imports the reference: backends.resolve alone chooses it, and says why."""
    import ddpm_kernels.extension as ext

    for module in (ext,):
        assert "reference" not in vars(module)
    cpu = backends.available_backends("cpu")
    if "cpu" in cpu:
        opts = StepOptions("ddim", threshold_ratio=0.9)
        monkeypatch.setattr(backends, "_warned", set())  # the warning is once per process
        with pytest.warns(RuntimeWarning, match="dynamic thresholding"):
            name, fn = backends._select("ddim_step", "cpu", torch.device("cpu"), torch.float32, opts, None)
        assert name == "reference" and fn is reference.sampler_step_ref
        grad = frozenset(("x_start",))
        name, _ = backends.resolve("diffusion_loss", "auto", torch.device("cpu"), torch.float32, None, grad)
        assert name == "reference"
        name, _ = backends.resolve("q_sample", "auto", torch.device("cpu"), torch.float32, None, grad)
        assert name == "cpu"


def test_loss_refuses_a_sampling_only_schedule():
    s = dk.DiffusionSchedule("linear", 1, sampling_only=True)
    x, t = torch.randn(2, 3), torch.zeros(2, dtype=torch.int64)
    dk.p_sample(x, t, x, s, noise=x)  # sampling is what the schedule is for
    with pytest.raises(ValueError, match="sampling_only=True"):
        dk.diffusion_loss(x, x, x, t, s)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in dk.available_backends("cpu")])
def test_steps_return_out_itself_when_an_input_requires_grad(backend):
    """Sampling ops run on detached inputs on fused backends; ``out`` is written, not detached: the step returns
    the very tensor passed."""
    s = dk.DiffusionSchedule("linear", 50)
    x, t = torch.randn(2, 3, 4), torch.tensor([5, 9])
    model_output = torch.randn(2, 3, 4, requires_grad=True)
    out = torch.empty_like(x)
    assert dk.ddim_step(x, t, t - 1, model_output, s, 0.0, out=out, backend=backend) is out
    assert dk.ddpm_step(x, t, t - 1, model_output, s, noise=x, out=out, backend=backend) is out
    assert dk.p_sample(x, t, model_output, s, noise=x, out=out, backend=backend) is out
