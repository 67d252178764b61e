"""``python -m ddpm_kernels bench``: every backend against eager PyTorch and torch.compile, side by side.

The cases come from the op table (``ddpm_kernels._spec.OPS``): every op at its option defaults with given
noise; ``<op>_rng`` for an op that draws its own noise at those defaults; ``<op>_fwd_bwd`` for a loss (forward
and the gradient w.r.t. its data tensor). For each case x shape x dtype x provider one row: median time per
call (and 20/80% quantiles), the bytes the op must move (the table's data, like and read optional tensors in,
its ``like`` outputs out), GB/s, % of the copy bandwidth measured in the same run for as many bytes, speedup
vs eager and vs torch.compile, launches per call and host syncs per call (counted with the profiler and
``torch.cuda.set_sync_debug_mode``, not assumed). Results go to JSON (with device, versions, date, commit), and
a markdown table and a PNG plot are generated from the JSON.

Providers
  eager       the pure-PyTorch reference (``backend="reference"``): the seed's eager per-step code
  compile     ``torch.compile`` of that same call (compile time reported separately, excluded from timings)
  <backend>   each fused backend available for the device and dtype (cpu / triton / cuda)
  <backend>+out   the same with a preallocated ``out=`` (the ops that take one)
  diffusers   the stock scheduler call doing a case's work, when installed (``add_noise``, ``DDPMScheduler.step``,
              ``DDIMScheduler.step``; for flow matching ``FlowMatchEulerDiscreteScheduler.scale_noise`` and
              ``.step``, and for ``flow_step_guided`` the pipelines' eager CFG, then the stock step)

Shapes: ``--shapes 16x4x64x64 2x4096x64`` (any number of dims: ``2x4096x64`` is a transformer's (batch,
tokens, channels)) or presets ``gpu``, ``cpu``, ``flow`` (SD3 / Flux 16-channel latents 1x16x64x64,
16x16x64x64 and 4x16x128x128, and 2x4096x64 tokens), ``flow-cpu`` (the first and the last).

``--host-overhead`` measures instead the host time per call at 1x4x8x8 fp32 on one CPU thread: ``torch.add``,
every public op on the CPU backend, the compiled ``p_sample`` operator called directly, and diffusers' stock
schedulers' ``step`` against the fused ones.
"""

from .cases import CASES, DTYPES, MEMORY_FORMATS, Case, CaseSpec, select_cases  # noqa: F401
from .cli import CPU_SHAPES, FLOW_CPU_SHAPES, FLOW_GPU_SHAPES, GPU_SHAPES, main, parse_shape  # noqa: F401
from .report import markdown, plot, write_outputs  # noqa: F401
from .sweep import Row, end_to_end, providers, run_case  # noqa: F401
from .timing import copy_bandwidth, count_host_syncs, count_launches, time_fn  # noqa: F401
