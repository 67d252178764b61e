"""The flow-matching drop-in: ``FusedFlowMatchEulerDiscreteScheduler`` (SD3, Flux, Wan, LTX, Mochi pipelines).

It subclasses diffusers' ``FlowMatchEulerDiscreteScheduler`` with the same config; ``set_timesteps`` (shift,
dynamic shifting with ``mu``, Karras / exponential / beta sigmas, ``shift_terminal``, ``invert_sigmas``,
custom sigmas or timesteps) is the stock code, so the sigma table and the timesteps are the stock ones, bit for
bit. ``step`` is one `ddpm_kernels.flow_step` and ``scale_noise`` one `ddpm_kernels.flow_interpolate`, on
``backend="auto"`` (the attribute ``fused_backend`` chooses another). What changes against the stock class:

* ``step`` does not synchronize with the device. The step index is a Python int kept exactly as the stock
  scheduler keeps it (``step_index``, ``begin_index``, ``set_begin_index``), plus an int64 (B,) tensor on the
  sample's device, advanced on the device after each step, from which the op gathers ``sigmas[i]`` and
  ``sigmas[i + 1]``. The first step finds its index without reading the device when the timestep is a view of
  ``scheduler.timesteps`` (what iterating it yields, on any device: its offset into the storage gives its
  position), a Python number or a CPU tensor (``set_timesteps`` keeps host copies of the timesteps); another
  device timestep is looked up by the stock ``index_for_timestep`` once, on the first step, as the stock step
  does.
* ``scale_noise`` finds the step index of each timestep on the device (one comparison with the timesteps,
  with the stock rule: the second match when a value occurs twice), not with the stock per-element
  ``nonzero().item()`` loop. A device timestep that is not in the schedule gives NaN where the stock scheduler
  raises ``IndexError`` (telling the two apart would need the host sync this avoids); on the CPU the stock
  error is raised.
* ``per_token_timesteps`` (LTX): the next sigma of each token, the largest table sigma below the token's sigma
  by more than 1e-6 (0 if none), as the stock step defines it, comes from a binary search in an ascending copy
  of the table kept on the device, not from a (steps x B x L) mask. As in the stock step, this branch moves
  the sample by ``(sigma - sigma_next) * model_output`` (the opposite sign of the per-sample branch) and
  returns float32.
* Noise (``stochastic_sampling=True``) is drawn exactly as the stock step draws it (``randn_tensor`` of the
  sample's shape, float32, from the same generator), so the same generator gives the same images and ends in
  the same state. ``in_kernel_noise = True`` (an attribute, off by default) lets the backend generate it
  instead (a different noise stream).
* The step computes in float32 whatever the dtypes (float64 for a float64 model output) and rounds once to the
  stock output dtype. For bf16 / fp16 inputs the stock ``step`` rounds ``dt * model_output`` to the model
  dtype first and the stock ``scale_noise`` rounds the sigmas and each intermediate to the sample dtype; the
  fused results are closer to the float64 computation.
* `FusedFlowMatchEulerDiscreteScheduler.guided_step` (not stock API) takes the batched ``[uncond; cond]``
  model output and a guidance scale and forms ``u + w (c - u)`` inside the step.

Every stock argument is accepted (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` are ignored, as the stock
step ignores them); integer timesteps get the stock error. What the fused ops do not take runs the stock code,
with one warning per scheduler and cause: a model output or noise of another shape, dtype (noise) or device
than the sample, a sigma table that is not a 1-D float32 tensor, a step index outside the table, per-token
timesteps other than float32 (B, L) for a (B, L, C) sample on the table's device, a timestep for
``scale_noise`` that is not a 1-D tensor of one or B values, an MPS ``scale_noise``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from ... import flow as flow_ops
from ...reference import compute_dtype, guided_output
from . import _common
from ._common import _DIRECT_DTYPES, _device, _FusedBase, _stock_timestep, _StepIndex, SigmaTables

__all__ = ["FusedFlowMatchEulerDiscreteScheduler"]

# the stock per-token step's margin: the next sigma is below the token's sigma by more than this
_PER_TOKEN_MARGIN = 1e-6
# the dtype each timestep dtype is compared in against a float32 schedule (a 0-d tensor's promotion rule)
_COMPARE_DTYPES = {}


class _Tables(SigmaTables):
    """`SigmaTables` with whether the table is finite; ``devices`` holds ``(sigmas, timesteps, ascending sigmas)``
    per device."""

    __slots__ = ("finite",)


class FusedFlowMatchEulerDiscreteScheduler(
    _StepIndex, _FusedBase, FlowMatchEulerDiscreteScheduler, output=FlowMatchEulerDiscreteSchedulerOutput
):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.flow_step` and ``scale_noise`` as one `ddpm_kernels.flow_interpolate`; see the module
    docstring for what differs."""

    # ------------------------------------------------------------------ tables
    def set_timesteps(
        self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
        sigmas: Optional[List[float]] = None, mu: Optional[float] = None, timesteps: Optional[List[float]] = None
    ):
        # computed on the host (the same float32 arithmetic), so host copies exist without reading a device
        super().set_timesteps(num_inference_steps=num_inference_steps, device=None, sigmas=sigmas, mu=mu,
                              timesteps=timesteps)
        host_timesteps, host_sigmas = self.timesteps, self.sigmas
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self.sigmas = self.sigmas.to(device)
        tables = self._dk_new_tables(host_timesteps, host_sigmas)
        if device is not None and tables.stock is None:
            self._dk_device_tables(tables, _device(device))  # the device copies now rather than in a step

    _dk_table_class = _Tables

    def _dk_fill_tables(self, tables: _Tables) -> None:
        tables.finite = tables.stock is None and bool(torch.isfinite(tables.host_sigmas).all())

    def _dk_device_tables(self, tables: _Tables, device: torch.device):
        """``(sigmas, timesteps, ascending sigmas)`` on ``device``, copied there once per schedule."""
        entry = tables.devices.get(device)
        if entry is None:
            sigmas = self.sigmas if self.sigmas.device == device else tables.host_sigmas.to(device)
            timesteps = self.timesteps if self.timesteps.device == device else tables.host_timesteps.to(device)
            ascending = torch.sort(tables.host_sigmas).values.to(device)
            entry = tables.devices[device] = (sigmas.contiguous(), timesteps, ascending)
        return entry

    # ------------------------------------------------------------------ step
    def step(
        self, model_output: torch.FloatTensor, timestep: Union[float, torch.FloatTensor], sample: torch.FloatTensor,
        s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
        generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
        return_dict: bool = True
    ):
        """As ``FlowMatchEulerDiscreteScheduler.step``, fused and sync-free."""
        lane = None if per_token_timesteps is not None else self._dk_lane(model_output, timestep, sample)
        dtype = sample.dtype if lane is not None else None
        if lane is not None and not self.config.stochastic_sampling and model_output.dtype == dtype and (
                dtype in _DIRECT_DTYPES):
            # the next step of the schedule the last fused step checked, on operands of the kind it checked
            prev_sample = self._dk_direct(lane, model_output, sample, dtype)
        else:
            prev_sample = self._dk_step(model_output, timestep, sample, generator, per_token_timesteps)
        if prev_sample is None:
            return super().step(
                model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                generator=generator, per_token_timesteps=per_token_timesteps, return_dict=return_dict,
            )
        return self._make_output(prev_sample) if return_dict else (prev_sample,)

    def guided_step(
        self, model_output: torch.FloatTensor, timestep: Union[float, torch.FloatTensor], sample: torch.FloatTensor,
        guidance_scale: float, guidance_rescale: float = 0.0, generator: Optional[torch.Generator] = None,
        return_dict: bool = True
    ):
        """``step`` with classifier-free guidance formed inside the fused op (an extension, not stock API).

        ``model_output``: the batched ``[uncond; cond]`` output of shape (2B, ...) for a sample of shape
        (B, ...), as pipelines' ``noise_pred.chunk(2)`` splits it. Equals ``step(u + guidance_scale * (c - u),
        timestep, sample)`` (with diffusers' ``rescale_noise_cfg`` of the guided output by ``guidance_rescale``
        when it is > 0), the guidance computed in float32 instead of the model dtype, without materializing the
        guided output. ``guidance_scale`` is a number or a float tensor of shape (B,) on the sample's device.
        """
        guidance = (guidance_scale, guidance_rescale)
        prev_sample = self._dk_step(model_output, timestep, sample, generator, None, guidance)
        if prev_sample is None:
            # the stock step on the guided output, formed as flow_step's reference forms it
            uncond, cond = model_output.chunk(2)
            scale = guidance_scale
            if not isinstance(scale, torch.Tensor):
                scale = torch.full((cond.shape[0],), float(scale), device=cond.device)
            guided = guided_output(cond, uncond, scale.expand(cond.shape[0]), float(guidance_rescale),
                                   torch.promote_types(torch.float32, cond.dtype)).to(cond.dtype)
            return self.step(guided, timestep, sample, generator=generator, return_dict=return_dict)
        return self._dk_output((prev_sample,), return_dict)

    def _dk_direct(self, lane, model_output, sample, dtype):
        """The deterministic step on ``lane`` (`_dk_lane`: no gradient asked of the operands), its ``prev_sample``
        (the step index advanced): the op on the operands as they are, through the lane's server
        (`flow.table_step_server`, kept per backend and dtype), which also writes the advanced index into the
        lane's index tensor (`_dk_advance` in the same call)."""
        sigmas, entry, backend = lane.sigmas, lane.index, self.fused_backend
        server = lane.server
        if server is None or server[0] != backend or server[1] != dtype:
            server = lane.server = (backend, dtype, flow_ops.table_step_server(backend, sample))
        index = entry[1] + 1  # (the lane's entry holds the Python step index: `_dk_lane`)
        prev_sample = server[2](sample, model_output, sigmas, entry[0], index)
        self._step_index = entry[1] = index
        return prev_sample

    def _dk_step(self, model_output, timestep, sample, generator, per_token_timesteps, guidance=None):
        """The fused step's ``prev_sample`` (the step index advanced), or None when the stock step is to take
        the call (nothing changed then but a first step's index, which the stock step would set the same)."""
        if _stock_timestep(timestep):
            return None  # the stock step's error
        if not self._dk_step_inputs(model_output, sample, guidance):
            return None
        tables = self._dk_fused_tables()
        if tables is None:
            return None
        if per_token_timesteps is not None and not self._dk_per_token_ok(per_token_timesteps, sample, tables):
            return None
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        size = tables.host_sigmas.shape[0]
        if not (type(index) is int or isinstance(index, np.integer)) or not 0 <= index < size - 1:
            self._dk_stock("step_index", f"step index {index!r} is not a step of the {size}-sigma table")
            return None
        index = int(index)
        device = sample.device
        entry = tables.devices.get(device)
        sigmas, _, ascending = entry if entry is not None else self._dk_device_tables(tables, device)
        stochastic = bool(self.config.stochastic_sampling)
        out_dtype = model_output.dtype
        if per_token_timesteps is None and not stochastic and sample.dtype == out_dtype and out_dtype in _DIRECT_DTYPES:
            x, v = sample, model_output  # the op reads them in their dtype, computes in float32, rounds once
        else:
            # the stock arithmetic's dtype: the sample upcast to float32, promoted with the model output
            work = torch.promote_types(torch.float32, out_dtype)
            x = sample if sample.dtype == torch.float32 else sample.to(torch.float32)
            if work != torch.float32:
                x = x.to(work)
            v = model_output if out_dtype == work else model_output.to(work)
        noise, generator_for_op = None, None
        if stochastic:
            in_kernel, generator_for_op = self._dk_kernel_generator(generator)
            if not in_kernel:
                # the stock draw: randn_tensor(sample.shape, generator, sample.device, float32)
                noise = self._dk_randn(sample.shape, generator, device, torch.float32, x.dtype)
        if per_token_timesteps is None:
            step_index = self._dk_table_index(index, sample, tables, sigmas)
            if guidance is None and sigmas.dtype == compute_dtype(x.dtype):
                # every operand built here as the op reads it and checked as it checks them (x, v and noise share
                # a dtype; the table and the in-range index are the scheduler's own)
                prev_sample = flow_ops.checked_table_step(self.fused_backend, x, v, sigmas, step_index, stochastic,
                                                          noise, generator_for_op)
            elif guidance is None:
                prev_sample = flow_ops.flow_step(x, v, sigmas, step_index, noise, generator_for_op, self.fused_backend,
                                                 stochastic=stochastic)
            else:
                prev_sample = flow_ops.flow_step(x, v, sigmas, step_index, noise, generator_for_op, self.fused_backend,
                                                 stochastic=stochastic, guidance_scale=guidance[0],
                                                 guidance_rescale=guidance[1])
            if prev_sample.dtype != out_dtype:
                prev_sample = prev_sample.to(out_dtype)
        else:
            sigma, sigma_next = self._dk_per_token_sigmas(per_token_timesteps, ascending)
            if not stochastic:
                # the stock per-token step moves by (sigma - sigma_next) * v: the op's x + (b - a) v with a, b swapped
                sigma, sigma_next = sigma_next, sigma
            prev_sample = flow_ops.flow_step(
                x, v, None, None, noise, generator_for_op, self.fused_backend, sigma=sigma, sigma_next=sigma_next,
                stochastic=stochastic,
            )
        self._dk_advance()
        return prev_sample

    def _dk_step_inputs(self, model_output, sample, guidance) -> bool:
        """Whether the fused op takes these tensors as the stock step would (else the stock step does)."""
        if guidance is None:
            return self._dk_inputs_ok(model_output, sample)
        return self._dk_inputs_ok(model_output, sample,
                                  expected_shape=lambda x: torch.Size((2 * x.shape[0],) + tuple(x.shape[1:])),
                                  expected="the model output of the sample's shape, batched [uncond; cond] for "
                                  "guided_step")

    def _dk_per_token_ok(self, per_token_timesteps, sample, tables: _Tables) -> bool:
        ok = (
            isinstance(per_token_timesteps, torch.Tensor)
            and per_token_timesteps.dtype in (torch.float32, torch.int64, torch.int32)
            and per_token_timesteps.ndim == 2
            and sample.ndim == 3
            and per_token_timesteps.shape == sample.shape[:2]
            and per_token_timesteps.device == sample.device == self.sigmas.device
            and tables.finite
        )
        if not ok:
            what = (f"{per_token_timesteps.dtype} tensor of shape {tuple(per_token_timesteps.shape)} on "
                    f"{per_token_timesteps.device}" if isinstance(per_token_timesteps, torch.Tensor)
                    else type(per_token_timesteps).__name__)
            self._dk_stock(
                "per_token_timesteps",
                f"per_token_timesteps is a {what}; the fused step takes float32 (B, L) timesteps for a (B, L, C) "
                f"sample on the sigma table's device (here a sample of shape {tuple(sample.shape)} on "
                f"{sample.device}, the table on {self.sigmas.device}, {'finite' if tables.finite else 'not finite'})",
            )
        return ok

    def _dk_per_token_sigmas(self, per_token_timesteps, ascending):
        """Each token's ``(sigma, sigma_next)`` as (B, L, 1) float32 tensors, as the stock step defines them."""
        sigma = per_token_timesteps / self.config.num_train_timesteps
        # the number of table sigmas below the token's sigma by more than the margin
        below = torch.searchsorted(ascending, sigma - _PER_TOKEN_MARGIN)
        n = ascending.shape[0]
        sigma_next = torch.where(below > 0, torch.take(ascending, (below - 1).clamp_(min=0)), 0.0)
        # the stock max runs over the masked table, whose unmasked entries count as 0
        sigma_next = torch.where(below < n, sigma_next.clamp(min=0.0), sigma_next)
        return sigma.unsqueeze(-1), sigma_next.unsqueeze(-1)

    # ------------------------------------------------------------------ forward process
    def scale_noise(
        self,
        sample: torch.FloatTensor,
        timestep: Union[float, torch.FloatTensor],
        noise: Optional[torch.FloatTensor] = None,
    ) -> torch.FloatTensor:
        """``sigma * noise + (1 - sigma) * sample`` as one fused `ddpm_kernels.flow_interpolate`, the sigmas
        found on the device."""
        sigma = self._dk_scale_sigma(sample, timestep, noise)
        if sigma is None:
            return super().scale_noise(sample, timestep, noise)
        return flow_ops.flow_interpolate(sample, noise, sigma, self.fused_backend)

    def _dk_scale_sigma(self, sample, timestep, noise) -> Optional[torch.Tensor]:
        """The (B,) sigma of each sample for ``scale_noise``, or None for the stock code."""
        if not (
            isinstance(sample, torch.Tensor)
            and isinstance(noise, torch.Tensor)
            and isinstance(timestep, torch.Tensor)
            and sample.is_floating_point()
            and sample.ndim >= 1
            and noise.shape == sample.shape
            and noise.dtype == sample.dtype
            and noise.device == sample.device
            and sample.device.type != "mps"
            and timestep.ndim == 1
            and timestep.shape[0] in (1, sample.shape[0])
            and not timestep.is_complex()
        ):
            self._dk_stock("scale_noise", "scale_noise takes a float sample, a noise tensor of its shape, dtype and "
                           "device, and a 1-D timestep tensor of 1 or B values")
            return None
        tables = self._dk_fused_tables()
        if tables is None:
            return None
        device = sample.device
        sigmas, timesteps, _ = self._dk_device_tables(tables, device)
        if self.begin_index is None:
            sigma = self._dk_sigmas_of(timestep.to(device), sigmas, timesteps, _common.on_host(sample))
            if sigma is None:
                return None
        else:
            index = self.begin_index if self.step_index is None else self.step_index
            if not (type(index) is int or isinstance(index, np.integer)) or not 0 <= index < sigmas.shape[0]:
                self._dk_stock("step_index", f"step index {index!r} is not in the {sigmas.shape[0]}-sigma table")
                return None
            sigma = sigmas[int(index):int(index) + 1]
        batch = sample.shape[0]
        return sigma if sigma.shape[0] == batch else sigma.expand(batch)

    @staticmethod
    def _dk_sigmas_of(timestep, sigmas, timesteps, on_host: bool) -> Optional[torch.Tensor]:
        """The sigma of each timestep at the stock ``index_for_timestep`` (the second match when a value occurs
        twice), found on the device; NaN for a timestep not in the schedule (None on the host, where the stock
        code raises its error)."""
        dtype = _COMPARE_DTYPES.get((timesteps.dtype, timestep.dtype))
        if dtype is None:
            # the stock code compares the schedule with each 0-d element: a 0-d operand's promotion rule
            dtype = _COMPARE_DTYPES[(timesteps.dtype, timestep.dtype)] = torch.result_type(
                torch.empty(1, dtype=timesteps.dtype), torch.empty((), dtype=timestep.dtype))
        schedule = timesteps if timesteps.dtype == dtype else timesteps.to(dtype)
        equal = schedule.unsqueeze(0) == timestep.to(dtype).unsqueeze(1)  # (N, S)
        size = schedule.shape[0]
        positions = torch.arange(size, device=timestep.device)
        first = torch.where(equal, positions, size).amin(dim=1)
        second = torch.where(equal & (positions != first.unsqueeze(1)), positions, size).amin(dim=1)
        count = equal.sum(dim=1)
        if on_host and bool((count == 0).any()):
            return None  # the stock loop raises IndexError for it
        index = torch.where(count > 1, second, first).clamp_(max=sigmas.shape[0] - 1)
        return torch.where(count > 0, sigmas.index_select(0, index), math.nan)
