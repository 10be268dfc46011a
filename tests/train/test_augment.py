"""Training augmentation (augment.py): dtype / shape / range, the D4 group, CT never flipped, eval no-op."""

from __future__ import annotations

import pytest
import torch
from crc_train.augment import (
    AUGMENTS,
    D4_SIZE,
    Augment,
    apply_d4,
    colour_jitter_he,
    intensity_affine_ct,
)

S = 28


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 256, (n, S, S, 3), dtype=torch.uint8, generator=g)
    r = torch.randint(0, 256, (n, S, S, 1), dtype=torch.uint8, generator=g)
    return p, r


@pytest.mark.parametrize("mode", AUGMENTS)
def test_each_mode_keeps_dtype_shape_and_range(mode: str) -> None:
    p, r = _batch()
    # saturated tiles too: a white tile made brighter must stay 255, not wrap around to dark values
    p[0], p[1], r[0], r[1] = 255, 0, 255, 0
    torch.manual_seed(0)
    ap, ar = Augment(mode)(p, r)
    assert ap.dtype == p.dtype == torch.uint8 and ar.dtype == torch.uint8
    assert ap.shape == p.shape and ar.shape == r.shape
    assert ap.is_contiguous() or ap.shape == p.shape  # any layout the model's preprocessing accepts
    if mode == "none":
        assert torch.equal(ap, p) and torch.equal(ar, r)
    else:
        assert not torch.equal(ap, p)
    # the pixels of a D4 image are a permutation of the original's: the histogram is unchanged
    if mode == "d4":
        assert torch.equal(torch.sort(ap.flatten(1)).values, torch.sort(p.flatten(1)).values)
        assert torch.equal(ar, r)


def test_jitter_saturates_instead_of_wrapping() -> None:
    white = torch.full((2, S, S, 3), 255, dtype=torch.uint8)
    out = colour_jitter_he(white, torch.ones(2, 3), torch.zeros(2, 3), torch.full((2,), 1.1), torch.ones(2))
    assert torch.equal(out, white)
    ct = torch.full((2, S, S, 1), 250, dtype=torch.uint8)
    out = intensity_affine_ct(
        ct, torch.zeros(2), torch.ones(2), torch.zeros(2, 2), torch.full((2,), 1.1), torch.ones(2)
    )
    assert out[:, 4:-4, 4:-4].min() == 255  # 250 x 1.1 = 275 -> 255


@pytest.mark.parametrize("mode", AUGMENTS)
def test_every_mode_is_the_identity_in_eval_mode(mode: str) -> None:
    p, r = _batch()
    aug = Augment(mode).eval()
    state = torch.get_rng_state()
    ap, ar = aug(p, r)
    assert ap is p and ar is r
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws nothing either
    assert list(aug.state_dict()) == []  # nothing of it can reach a checkpoint or an export


def test_identity_parameters_give_the_input_back() -> None:
    p, r = _batch(8)
    n = 8
    assert torch.equal(
        colour_jitter_he(p, torch.ones(n, 3), torch.zeros(n, 3), torch.ones(n), torch.ones(n)), p
    )
    same = intensity_affine_ct(
        r, torch.zeros(n), torch.ones(n), torch.zeros(n, 2), torch.ones(n), torch.ones(n)
    )
    assert torch.equal(same, r)
    assert torch.equal(apply_d4(p, torch.zeros(n, dtype=torch.int64)), p)


def _symmetries(img: torch.Tensor) -> set[bytes]:
    """The eight symmetries of the square of an HWC image, made with rot90 and one mirror (not apply_d4)."""
    out = set()
    for base in (img, img.flip(1)):
        for k in range(4):
            out.add(torch.rot90(base, k, dims=(0, 1)).contiguous().numpy().tobytes())
    return out


def test_d4_is_exactly_the_eight_symmetries() -> None:
    img = torch.arange(5 * 5 * 2, dtype=torch.uint8).reshape(5, 5, 2)  # no symmetry of its own
    expected = _symmetries(img)
    assert len(expected) == D4_SIZE == 8
    codes = torch.arange(D4_SIZE)
    got = apply_d4(img.expand(D4_SIZE, -1, -1, -1), codes)
    assert {g.contiguous().numpy().tobytes() for g in got} == expected  # eight distinct, all symmetries

    # the random mode draws only these, and all of them: 400 copies of one tile
    torch.manual_seed(0)
    tile = torch.randint(0, 256, (1, S, S, 3), dtype=torch.uint8)
    out, _ = Augment("d4")(
        tile.expand(400, -1, -1, -1).contiguous(), torch.zeros(400, S, S, 1, dtype=torch.uint8)
    )
    seen = {o.contiguous().numpy().tobytes() for o in out}
    assert seen == _symmetries(tile[0])


def test_d4_refuses_non_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        apply_d4(torch.zeros(1, 4, 5, 3), torch.zeros(1, dtype=torch.int64))


def test_radiology_is_never_flipped() -> None:
    # a slice with a bright band on the left and a dark one on the right
    n = 512
    r = torch.zeros(n, S, S, 1, dtype=torch.uint8)
    r[:, 4:-4, 2:10] = 200
    r[:, 4:-4, 18:26] = 40
    p = torch.zeros(n, S, S, 3, dtype=torch.uint8)
    torch.manual_seed(0)
    for mode in ("d4", "full"):
        _, ar = Augment(mode)(p, r)
        left = ar[:, :, : S // 2].float().mean(dim=(1, 2, 3))
        right = ar[:, :, S // 2 :].float().mean(dim=(1, 2, 3))
        # a mirror swaps the sides, a 90-degree turn evens them out: neither may ever happen
        assert (left > right + 20).all(), mode
    _, ar = Augment("d4")(p, r)
    assert torch.equal(ar, r)  # d4 leaves radiology alone


def test_same_seed_same_augmentation() -> None:
    p, r = _batch()
    torch.manual_seed(3)
    a = Augment("full")(p, r)
    torch.manual_seed(3)
    b = Augment("full")(p, r)
    torch.manual_seed(4)
    c = Augment("full")(p, r)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        Augment("heavy")


@pytest.mark.parametrize("mode", ["none", "d4"])  # modes that leave the CT pixels alone
def test_pair_shuffle_re_pairs_radiology_across_the_batch(mode: str) -> None:
    n = 64
    p = torch.zeros(n, S, S, 3, dtype=torch.uint8)
    r = (
        torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, S, S, 1).contiguous()
    )  # slice i is all i
    torch.manual_seed(0)
    _, ar = Augment(mode, pair_shuffle=True)(p, r)
    ids = ar[:, 0, 0, 0].long()
    assert sorted(ids.tolist()) == list(range(n))  # the same slices, each once ...
    assert (ids != torch.arange(n)).sum() > n // 2  # ... with new partners
    assert torch.equal(ar, r[ids])  # whole slices move, untouched by d4 / none
    aug = Augment(mode, pair_shuffle=True).eval()
    assert aug(p, r)[1] is r  # evaluation keeps the seeded pairing
