"""Per-op benchmarks: every provider (eager reference, torch.compile, fused backends, diffusers) on one case."""


def test_q_sample(run, provider):
    run("q_sample", provider)


def test_p_sample_given_noise(run, provider):
    run("p_sample", provider)


def test_p_sample_in_kernel_noise(run, provider):
    run("p_sample_rng", provider)


def test_diffusion_loss_fwd_bwd(run, provider):
    run("loss_fwd_bwd", provider)
