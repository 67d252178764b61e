"""Per-case benchmarks: every case of the op table (``ddpm_kernels.bench.CASES``: each op at its defaults, its
in-kernel-noise form, a loss with its gradient) x every provider that applies (eager reference, torch.compile,
fused backends and their ``out=`` forms, diffusers)."""


def test_case(run, case, provider):
    run(case, provider)
