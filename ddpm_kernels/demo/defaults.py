"""The demo's default sizes, shared by the library functions and the command line."""

# Defaults sized for about 5 minutes end to end on an idle 2-core x86 CPU (~0.19 s per training step with two
# threads); see benchmarks/results/demo/ for a measured run.
DEFAULT_STEPS = 1200
DEFAULT_TIMESTEPS = 200
# Euler steps of the rectified-flow sampler (``--objective flow``): straight paths need far fewer steps than DDPM.
DEFAULT_FLOW_STEPS = 50
DEFAULT_BATCH_SIZE = 64
DEFAULT_IMAGE_SIZE = 16
DEFAULT_NUM_SAMPLES = 100
