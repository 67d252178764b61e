"""Every Triton kernel compiles to PTX and cubin for sm_90 and sm_80 on a machine without a GPU.

The other Triton tests run the kernels through the interpreter, which accepts code the GPU compiler rejects
(and vice versa); this test runs the real compiler (``triton.compile`` with an explicit ``GPUTarget``, Triton's
bundled ptxas) in a subprocess with ``TRITON_INTERPRET`` unset, so a kernel that only the interpreter accepts
fails here. It also checks from the PTX that 16-divisible, 16-byte-aligned tensors get 128-bit accesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r'''
    import json, os, sys
    assert "TRITON_INTERPRET" not in os.environ
    import triton
    from triton.backends.compiler import GPUTarget

    from ddpm_kernels.triton import utils
    from ddpm_kernels.triton.pair import PAIR_OPS, POSTERIOR_MEAN, pair_kernel
    from ddpm_kernels.triton.posterior import posterior_kernel
    from ddpm_kernels.triton.sampler_step import SAMPLERS, sampler_step_kernel
    from ddpm_kernels.triton.threshold import dynamic_threshold_kernel
    from ddpm_kernels.triton.guidance import guidance_stats_kernel
    from ddpm_kernels.triton.loss import (
        diffusion_loss_kernel, diffusion_loss_reduce_kernel, diffusion_loss_backward_kernel,
    )
    from ddpm_kernels.triton.euler import SAMPLER_ID, flow_step_kernel
    from ddpm_kernels.triton.solver import solver_step_kernel
    from ddpm_kernels.triton.flow import (
        flow_interpolate_kernel, flow_loss_kernel, flow_loss_reduce_kernel, flow_loss_backward_kernel,
    )
    assert not utils.INTERPRETED
    import torch
    from ddpm_kernels.triton import BACKEND
    assert BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is not None  # no CPU without interpreter
    R = utils.ROW

    DATA = {"x_start_ptr", "noise_ptr", "x_t_ptr", "model_output_ptr", "out_ptr", "a_ptr", "b_ptr", "out_b_ptr",
            "grad_model_output_ptr", "grad_x_start_ptr", "grad_noise_ptr",
            "loss_ptr", "loss_simple_ptr", "loss_vlb_ptr", "grad_loss_ptr", "grad_loss_simple_ptr",
            "grad_loss_vlb_ptr", "x0_ptr", "sample_ptr", "uncond_ptr", "grad_x0_ptr", "history_ptr", "last_ptr"}
    INDEX = {"t_ptr", "seed_ptr", "t_prev_ptr", "step_index_ptr"}
    FP64 = {"alphas_cumprod_ptr"}  # the sampler steps derive their coefficients from the float64 table
    COMPUTE = {"table_ptr", "var_ptr", "log_var_ptr", "partial_ptr", "scale_ptr", "sigma_ptr", "sigma_next_ptr",
               "guidance_ptr", "stats_ptr", "coefficients_ptr"}
    INT64 = {"philox_seed", "philox_offset", "sample_offset"}
    FLOATS = {"clip_hi", "clip_lo", "l_simple_weight_hi", "l_simple_weight_lo", "original_elbo_weight_hi", "original_elbo_weight_lo",
              "eta_hi", "eta_lo", "clip_range_hi", "clip_range_lo", "rescale_hi", "rescale_lo", "two_over_pi_hi",
              "two_over_pi_lo", *(f"{name}_{part}" for name in ("churn", "s_tmin", "s_tmax", "s_noise")
                                  for part in ("hi", "mid", "lo"))}

    def source(kernel, dtype, constexprs, aligned=False, ones=()):
        """ASTSource as the runtime would build it: pointers typed by role, ints i32 (specialized to the
        constexpr 1 for names in `ones`, as Triton does for an argument equal to 1), and with `aligned`
        the divisibility-by-16 attributes Triton adds for aligned pointers and 16-divisible ints."""
        compute = "fp64" if dtype == "fp64" else "fp32"
        names = kernel.arg_names
        signature, consts, attrs = {}, {}, {}
        for i, (name, param) in enumerate(zip(names, kernel.params)):
            if param.is_constexpr:
                signature[name] = "constexpr"
                consts[(i,)] = constexprs[name]
                continue
            if name in ones:
                signature[name] = "constexpr"
                consts[(i,)] = 1
                continue
            if name in DATA:
                signature[name] = "*" + dtype
            elif name in INDEX:
                signature[name] = "*i64"
            elif name in COMPUTE:
                signature[name] = "*" + compute
            elif name in FP64:
                signature[name] = "*fp64"
            elif name in FLOATS:
                signature[name] = "fp32"
            elif name in INT64:
                signature[name] = "i64"
            else:
                assert not name.endswith("_ptr"), f"{kernel.__name__}: untyped pointer {name}"
                signature[name] = "i32"
            if aligned and (signature[name].startswith("*") or name in ("N", "model_output_stride", "stride")):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return triton.compiler.ASTSource(kernel, signature, consts, attrs)

    def rows(**names):
        """Row constexprs from table names: rows(ROW_A="betas") -> {"ROW_A": TABLE_ROW["betas"]}."""
        return {k: R[v] for k, v in names.items()}

    E = dict(BLOCK=1024)  # elementwise kernels' block
    PAIR = {name: i for i, name in enumerate(PAIR_OPS)}
    # the posterior family's defaults (q_posterior: a given x0, unclipped, variances written); each case names
    # only what it changes
    POSTERIOR = dict(E, PARAMETERIZATION=1, CLIP_DENOISED=False, ADD_NOISE=False, HAS_NOISE=False,
                     WRITE_VARIANCE=True)
    P_SAMPLE = dict(POSTERIOR, ADD_NOISE=True, WRITE_VARIANCE=False)
    # the sampler steps' defaults (eps, fixed_small, final alpha 1, no option on)
    STEP = dict(E, PARAMETERIZATION=0, VARIANCE=0, CLIP_DENOISED=False, USE_CLIPPED_MODEL_OUTPUT=False,
                SET_ALPHA_TO_ONE=True, ADD_NOISE=False, HAS_NOISE=False, RETURN_X0=False, THRESHOLD=False,
                X0_ONLY=False, GUIDED=False, RESCALE=False, COMPUTE_FP64=False, BLOCK_SPLIT=2)
    DDIM = dict(STEP, **dict(zip(("SAMPLER", "EPS_TERM", "X_TERM"), SAMPLERS["ddim"])))
    DDPM = dict(STEP, ADD_NOISE=True, **dict(zip(("SAMPLER", "EPS_TERM", "X_TERM"), SAMPLERS["ddpm"])))
    # the flow step's defaults (sigmas per sample, unguided, deterministic); the Euler steps on a sigma table
    FLOW_STEP = dict(E, SAMPLER=SAMPLER_ID["flow"], PARAMETERIZATION=0, TABLE=False, SIGMA_PER_TOKEN=False,
                     SIGMA_NEXT_PER_TOKEN=False, GUIDED=False, RESCALE=False, ADD_NOISE=False, HAS_NOISE=False,
                     RETURN_X0=False, BLOCK_SPLIT=64)
    FLOW_STOCHASTIC = dict(FLOW_STEP, SAMPLER=SAMPLER_ID["flow_stochastic"], ADD_NOISE=True)
    EULER = dict(FLOW_STEP, SAMPLER=SAMPLER_ID["euler"], TABLE=True)
    EULER_ANCESTRAL = dict(FLOW_STEP, SAMPLER=SAMPLER_ID["euler_ancestral"], TABLE=True, ADD_NOISE=True)
    FLOW_LOSS = dict(E, WEIGHTING=0, SIGMA_PER_TOKEN=False, LOSS_L1=False)
    # the solver step's defaults (two history slots and the corrector's last sample, unguided, deterministic)
    SOLVER = dict(E, SLOTS=2, HAS_LAST=True, GUIDED=False, RESCALE=False, ADD_NOISE=False, HAS_NOISE=False,
                  NOISE_CHANNELS_LAST=False, CLIP=False, THRESHOLD=False, X0_ONLY=False, COMPUTE_FP64=False,
                  BLOCK_SPLIT=2)
    CASES = [
        *((f"pair[{name}]", pair_kernel, dict(E, OP=op, BACKWARD=False)) for name, op in PAIR.items()),
        ("pair[q_sample,backward]", pair_kernel, dict(E, OP=PAIR["q_sample"], BACKWARD=True)),
        ("pair[predict_noise_from_start,backward]", pair_kernel,
         dict(E, OP=PAIR["predict_noise_from_start"], BACKWARD=True)),
        ("pair[posterior_mean,backward]", pair_kernel, dict(E, OP=POSTERIOR_MEAN, BACKWARD=True)),
        ("posterior[q_posterior]", posterior_kernel, POSTERIOR),
        ("posterior[p_mean_variance,x0,clip]", posterior_kernel, dict(POSTERIOR, CLIP_DENOISED=True)),
        ("posterior[p_mean_variance,eps]", posterior_kernel, dict(POSTERIOR, PARAMETERIZATION=0)),
        ("posterior[p_sample,v,clip,philox]", posterior_kernel,
         dict(P_SAMPLE, PARAMETERIZATION=2, CLIP_DENOISED=True)),
        ("posterior[p_sample,eps,noise]", posterior_kernel, dict(P_SAMPLE, PARAMETERIZATION=0, HAS_NOISE=True)),
        ("ddim_step[eps,clip,philox,x0]", sampler_step_kernel,
         dict(DDIM, CLIP_DENOISED=True, USE_CLIPPED_MODEL_OUTPUT=True, ADD_NOISE=True, RETURN_X0=True)),
        ("ddim_step[v,eta0]", sampler_step_kernel, dict(DDIM, PARAMETERIZATION=2, SET_ALPHA_TO_ONE=False)),
        ("ddim_step[x0,noise]", sampler_step_kernel,
         dict(DDIM, PARAMETERIZATION=1, ADD_NOISE=True, HAS_NOISE=True)),
        ("ddpm_step[eps,fixed_small,philox,x0]", sampler_step_kernel, dict(DDPM, CLIP_DENOISED=True, RETURN_X0=True)),
        ("ddpm_step[v,fixed_large,noise]", sampler_step_kernel,
         dict(DDPM, PARAMETERIZATION=2, VARIANCE=1, HAS_NOISE=True)),
        ("ddpm_step[x0,learned]", sampler_step_kernel,
         dict(DDPM, PARAMETERIZATION=1, VARIANCE=2, CLIP_DENOISED=True)),
        ("ddpm_step[eps,learned_range]", sampler_step_kernel,
         dict(DDPM, VARIANCE=3, HAS_NOISE=True, RETURN_X0=True)),
        ("ddim_step[v,threshold,x0]", sampler_step_kernel,
         dict(DDIM, PARAMETERIZATION=2, CLIP_DENOISED=True, USE_CLIPPED_MODEL_OUTPUT=True, ADD_NOISE=True,
              HAS_NOISE=True, RETURN_X0=True, THRESHOLD=True)),
        ("ddim_step[eps,x0_only]", sampler_step_kernel, dict(DDIM, RETURN_X0=True, X0_ONLY=True)),
        ("ddpm_step[eps,learned_range,threshold]", sampler_step_kernel,
         dict(DDPM, VARIANCE=3, CLIP_DENOISED=True, THRESHOLD=True)),
        ("ddpm_step[v,learned,x0_only]", sampler_step_kernel,
         dict(DDPM, PARAMETERIZATION=2, VARIANCE=2, ADD_NOISE=False, RETURN_X0=True, X0_ONLY=True)),
        ("ddim_step[v,guided,philox]", sampler_step_kernel,
         dict(DDIM, PARAMETERIZATION=2, ADD_NOISE=True, GUIDED=True)),
        ("ddim_step[x0,guided,rescale,threshold,x0]", sampler_step_kernel,
         dict(DDIM, PARAMETERIZATION=1, GUIDED=True, RESCALE=True, BLOCK_SPLIT=64, THRESHOLD=True, RETURN_X0=True)),
        ("ddpm_step[eps,learned_range,guided,rescale,noise]", sampler_step_kernel,
         dict(DDPM, VARIANCE=3, HAS_NOISE=True, GUIDED=True, RESCALE=True, BLOCK_SPLIT=64)),
        ("ddpm_step[v,learned,guided,rescale,x0_only]", sampler_step_kernel,
         dict(DDPM, PARAMETERIZATION=2, VARIANCE=2, ADD_NOISE=False, RETURN_X0=True, X0_ONLY=True, GUIDED=True,
              RESCALE=True, BLOCK_SPLIT=4)),
        ("dynamic_threshold", dynamic_threshold_kernel, dict(E, COMPUTE_FP64=False)),
        ("diffusion_loss[v,l2]", diffusion_loss_kernel, dict(E, PARAMETERIZATION=2, LOSS_L1=False)),
        ("diffusion_loss[eps,l1]", diffusion_loss_kernel, dict(E, PARAMETERIZATION=0, LOSS_L1=True)),
        ("diffusion_loss_reduce", diffusion_loss_reduce_kernel,
         dict(BLOCK_B=32, BLOCK_P=128, **rows(ROW_LVLB="lvlb_weights_eps"))),
        ("diffusion_loss_backward[v]", diffusion_loss_backward_kernel,
         dict(E, PARAMETERIZATION=2, LOSS_L1=True, GRAD_X_START=True, GRAD_NOISE=True,
              **rows(ROW_LVLB="lvlb_weights_v"))),
        ("diffusion_loss_backward[x0]", diffusion_loss_backward_kernel,
         dict(E, PARAMETERIZATION=1, LOSS_L1=False, GRAD_X_START=True, GRAD_NOISE=False,
              **rows(ROW_LVLB="lvlb_weights_x0"))),
        ("flow_interpolate", flow_interpolate_kernel, dict(E, SIGMA_PER_TOKEN=False, BACKWARD=False)),
        ("flow_interpolate[per_token,backward]", flow_interpolate_kernel,
         dict(E, SIGMA_PER_TOKEN=True, BACKWARD=True)),
        ("guidance_stats", guidance_stats_kernel, E),
        ("flow_step[table]", flow_step_kernel, dict(FLOW_STEP, TABLE=True)),
        ("flow_step[per_token,guided,rescale,philox]", flow_step_kernel,
         dict(FLOW_STOCHASTIC, SIGMA_PER_TOKEN=True, GUIDED=True, RESCALE=True)),
        ("flow_step[table,guided,noise]", flow_step_kernel,
         dict(FLOW_STOCHASTIC, TABLE=True, GUIDED=True, HAS_NOISE=True)),
        ("euler_step[eps]", flow_step_kernel, EULER),
        ("euler_step[v,churn,philox,guided,rescale,x0]", flow_step_kernel,
         dict(EULER, PARAMETERIZATION=2, ADD_NOISE=True, GUIDED=True, RESCALE=True, RETURN_X0=True)),
        ("euler_ancestral_step[x0,noise,x0]", flow_step_kernel,
         dict(EULER_ANCESTRAL, PARAMETERIZATION=1, HAS_NOISE=True, RETURN_X0=True)),
        ("euler_ancestral_step[eps,philox,guided]", flow_step_kernel, dict(EULER_ANCESTRAL, GUIDED=True)),
        ("flow_loss[cosmap,per_token]", flow_loss_kernel, dict(FLOW_LOSS, WEIGHTING=2, SIGMA_PER_TOKEN=True)),
        ("flow_loss[sigma_sqrt,l1]", flow_loss_kernel, dict(FLOW_LOSS, WEIGHTING=1, LOSS_L1=True)),
        ("flow_loss_reduce", flow_loss_reduce_kernel, dict(BLOCK_B=32, BLOCK_P=128)),
        ("flow_loss_backward[cosmap,l1]", flow_loss_backward_kernel,
         dict(FLOW_LOSS, WEIGHTING=2, LOSS_L1=True, GRAD_X0=True, GRAD_NOISE=True)),
        ("flow_loss_backward[per_token]", flow_loss_backward_kernel,
         dict(FLOW_LOSS, WEIGHTING=1, SIGMA_PER_TOKEN=True, GRAD_X0=False, GRAD_NOISE=False)),
        ("solver_step[2,last]", solver_step_kernel, SOLVER),
        ("solver_step[guided,rescale,noise,clip]", solver_step_kernel,
         dict(SOLVER, GUIDED=True, RESCALE=True, ADD_NOISE=True, HAS_NOISE=True, CLIP=True, BLOCK_SPLIT=64)),
        ("solver_step[philox,channels_last,threshold]", solver_step_kernel,
         dict(SOLVER, SLOTS=1, HAS_LAST=False, ADD_NOISE=True, NOISE_CHANNELS_LAST=True, THRESHOLD=True)),
        ("solver_step[x0_only,guided]", solver_step_kernel, dict(SOLVER, X0_ONLY=True, GUIDED=True)),
        ("solver_step[philox,no history]", solver_step_kernel, dict(SOLVER, SLOTS=0, HAS_LAST=False, ADD_NOISE=True)),
    ]

    results = []
    def compile_one(label, kernel, constexprs, dtype, cc, **kw):
        if "COMPUTE_FP64" in constexprs:
            constexprs = dict(constexprs, COMPUTE_FP64=dtype == "fp64")
        compiled = triton.compile(source(kernel, dtype, constexprs, **kw), target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        results.append(dict(label=label, dtype=dtype, cc=cc, ptx=len(ptx), cubin=len(compiled.asm["cubin"]),
                            ld_v4=ptx.count("ld.global.v4"), st_v4=ptx.count("st.global.v4"), **kw))

    for label, kernel, constexprs in CASES:
        for cc in (90, 80):
            compile_one(label, kernel, constexprs, "bf16", cc)
        compile_one(label, kernel, constexprs, "fp64", 80)
        compile_one(label, kernel, constexprs, "fp32", 90, aligned=True)
    # Runtime specializations of an argument equal to 1 (one element per sample, batch of one).
    for label, kernel, constexprs in CASES:
        if "N" in kernel.arg_names:
            ones = ("N", "B") if "B" in kernel.arg_names else ("N",)
            compile_one(label, kernel, constexprs, "fp16", 90, ones=ones)
    json.dump(results, sys.stdout)
    '''
)


def test_every_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=repo, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout)
    assert {r["cc"] for r in results} == {80, 90}
    for r in results:
        assert r["ptx"] > 0 and r["cubin"] > 0, r
    # 128-bit vectorized access for aligned float32 tensors with a 16-divisible sample size.
    for r in results:
        if r.get("aligned") and r["label"] not in ("diffusion_loss_reduce", "flow_loss_reduce"):
            assert r["ld_v4"] > 0, r
            # the forward losses write one partial per tile, the rescale statistics four per split
            if not r["label"].startswith(("diffusion_loss[", "flow_loss[", "guidance_stats")):
                assert r["st_v4"] > 0, r
