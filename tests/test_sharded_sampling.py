"""Sharded sampling end to end (docs/design.md, "Noise streams"): two torch.distributed ranks (gloo, CPU) that
each sample 4 images with ``sample_offset = rank * 4`` from the same generator seed produce, gathered, exactly
the 8 images one process samples — for GaussianDiffusion's ancestral loop and FlowMatching's stochastic loop."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ddpm_kernels as dk

PER_RANK = 4
WORLD = 2
SHAPE = (3, 8, 8)


class _Denoiser(nn.Module):
    """A small per-sample model (no batch statistics), deterministic from its seed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(SHAPE[0], SHAPE[0], 3, padding=1)

    def forward(self, x, t, cond=None):
        return torch.tanh(self.conv(x)) + 1e-3 * t.to(x.dtype).reshape(-1, 1, 1, 1)


def _sample(kind, batch, sample_offset):
    gen = torch.Generator().manual_seed(1234)
    if kind == "ddpm":
        model = dk.GaussianDiffusion(_Denoiser(), dk.DiffusionSchedule(timesteps=12), image_size=SHAPE[1],
                                     channels=SHAPE[0])
        return model.sample(batch, generator=gen, progress=False, sample_offset=sample_offset)
    model = dk.FlowMatching(_Denoiser(), image_size=SHAPE[1], channels=SHAPE[0])
    return model.sample(batch, num_steps=6, generator=gen, progress=False, stochastic=True,
                        sample_offset=sample_offset)


def _rank(rank, kind, rendezvous, result):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        images = _sample(kind, PER_RANK, sample_offset=rank * PER_RANK)
        gathered = [torch.empty_like(images) for _ in range(WORLD)]
        dist.all_gather(gathered, images)
        if rank == 0:
            torch.save(torch.cat(gathered), result)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_two_ranks_reproduce_one_device(tmp_path, kind):
    result = os.fspath(tmp_path / "gathered.pt")
    mp.spawn(_rank, args=(kind, os.fspath(tmp_path / "rendezvous"), result), nprocs=WORLD, join=True)
    sharded = torch.load(result)
    whole = _sample(kind, WORLD * PER_RANK, sample_offset=0)
    assert sharded.shape == whole.shape
    assert torch.equal(sharded, whole)
    # without the offsets the ranks would repeat each other's noise
    assert not torch.equal(_sample(kind, PER_RANK, sample_offset=0), whole[PER_RANK:])
