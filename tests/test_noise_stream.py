"""The noise stream's specification (``ddpm_kernels.reference.philox_normal``; docs/design.md, "Noise
streams"): Philox4x32-10 against the Random123 known-answer vectors, the counter layout (a sample's noise does
not depend on the other samples of its batch or on where the batch is cut), and the normals' statistics."""

import torch

from ddpm_kernels.reference import philox4x32_10, philox_normal


def _words(c, key):
    return [int(w) for w in philox4x32_10(*(torch.tensor([v], dtype=torch.int64) for v in c), key)]


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10: (counter, key) -> output
    assert _words((0, 0, 0, 0), 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _words((0xFFFFFFFF,) * 4, 0xFFFFFFFF_FFFFFFFF) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert _words(pi, 0xA4093822 | (0x299F31D0 << 32)) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_shards_reproduce_the_whole_batch():
    """Samples 0..7 in one draw equal samples 0..3 and 4..7 drawn separately (first_sample = the shard's
    global index), for any per-sample size, including one that is not a multiple of 4."""
    for per_sample in (1, 7, 64, 4097):
        whole = philox_normal(99, 12, 0, 8, per_sample)
        halves = torch.cat([philox_normal(99, 12, 0, 4, per_sample), philox_normal(99, 12, 4, 4, per_sample)])
        assert torch.equal(whole, halves)
        assert torch.equal(philox_normal(99, 12, 3, 1, per_sample)[0], whole[3])


def test_keys_offsets_and_samples_give_independent_streams():
    base = philox_normal(1, 0, 0, 2, 256)
    for other in (philox_normal(2, 0, 0, 2, 256), philox_normal(1, 1, 0, 2, 256), philox_normal(1, 2**32, 0, 2, 256)):
        assert not torch.equal(other, base)
        assert abs(torch.corrcoef(torch.stack([other.flatten(), base.flatten()]))[0, 1].item()) < 0.1
    assert not torch.equal(base[0], base[1])


def test_normal_statistics():
    z = philox_normal(2024, 7, 0, 16, 16384).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(((z - z.mean()) ** 3).mean().item()) < 0.05
    assert abs(((z - z.mean()) ** 4).mean().item() - 3) < 0.1
    flat = z.flatten()
    for lag in (1, 2, 3, 4, 5):
        assert abs(torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()) < 0.01
    assert bool(z.isfinite().all())
