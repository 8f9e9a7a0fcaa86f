import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from longcat_data.buckets import (
    InputTooSmall,
    aspect_distance,
    choose_bucket,
    clip_starts,
    cover_scale,
    latent_frames,
    make_buckets,
    trim_to_4k_plus_1,
)

areas = st.tuples(st.integers(8, 64), st.integers(8, 64)).map(lambda hw: (hw[0] * 16, hw[1] * 16))
grids = st.sampled_from([16, 32, 64])
sides = st.integers(16, 4096)


def test_default_buckets_hold_the_official_480p_family() -> None:
    buckets = make_buckets()
    for bucket in [(480, 832), (832, 480), (640, 640), (512, 768), (768, 512), (448, 896)]:
        assert bucket in buckets


@given(area=areas, grid=grids)
def test_buckets_are_on_the_grid_and_close_to_the_area(area: tuple[int, int], grid: int) -> None:
    pixels = area[0] * area[1]
    buckets = make_buckets(area, grid=grid)
    assert area in buckets and area[::-1] in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        if (h, w) not in (area, area[::-1]):
            assert h % grid == 0 and w % grid == 0
            # The long side is the grid multiple nearest the area, so it is off by at most half a step.
            assert abs(h * w - pixels) <= grid / 2 * min(h, w) + 1e-9
        assert max(h, w) / min(h, w) <= max(4.0, max(area) / min(area))


@given(area=areas, grid=grids)
def test_buckets_come_in_both_orientations(area: tuple[int, int], grid: int) -> None:
    buckets = set(make_buckets(area, grid=grid))
    assert {(w, h) for h, w in buckets} == buckets


@given(h=sides, w=sides)
def test_chosen_bucket_is_nearest_in_aspect(h: int, w: int) -> None:
    buckets = make_buckets()
    chosen = choose_bucket(h, w, buckets, allow_upscale=True)
    assert all(aspect_distance(h, w, chosen) <= aspect_distance(h, w, b) for b in buckets)


@given(h=sides, w=sides)
def test_small_sources_are_refused_not_upscaled(h: int, w: int) -> None:
    buckets = make_buckets()
    bucket = choose_bucket(h, w, buckets, allow_upscale=True)
    if cover_scale(h, w, bucket) > 1.0:
        with pytest.raises(InputTooSmall, match="upscaling"):
            choose_bucket(h, w, buckets)
    else:
        assert choose_bucket(h, w, buckets) == bucket
        # Covering never needs more than the source: the crop fits inside the frame.
        scale = cover_scale(h, w, bucket)
        assert bucket[0] <= math.floor(h * scale + 1e-9) and bucket[1] <= math.floor(w * scale + 1e-9)


def test_orientations_land_in_matching_buckets() -> None:
    buckets = make_buckets()
    assert choose_bucket(1080, 1920, buckets) == (480, 832)  # 16:9 landscape is nearest 480x832
    assert choose_bucket(1920, 1080, buckets) == (832, 480)
    assert choose_bucket(1080, 1080, buckets) == (640, 640)
    with pytest.raises(InputTooSmall, match="320x240"):
        choose_bucket(240, 320, buckets)
    with pytest.raises(InputTooSmall, match="no pixels"):
        choose_bucket(0, 320, buckets)


@given(available=st.integers(0, 500), max_frames=st.integers(5, 200))
def test_trim_is_the_largest_4k_plus_1_within_both_limits(available: int, max_frames: int) -> None:
    if available < 5:
        with pytest.raises(InputTooSmall):
            trim_to_4k_plus_1(available, max_frames)
        return
    frames = trim_to_4k_plus_1(available, max_frames)
    assert (frames - 1) % 4 == 0
    assert 5 <= frames <= min(available, max_frames)
    assert frames + 4 > min(available, max_frames)


def test_trim_defaults_to_93() -> None:
    assert trim_to_4k_plus_1(1000) == 93
    assert trim_to_4k_plus_1(92) == 89
    with pytest.raises(InputTooSmall, match="3 frames"):
        trim_to_4k_plus_1(3)


@given(
    available=st.integers(0, 400),
    clip=st.integers(1, 100),
    max_clips=st.integers(1, 6),
    stride=st.none() | st.integers(1, 100),
)
def test_clip_starts_fit_and_step_by_stride(
    available: int, clip: int, max_clips: int, stride: int | None
) -> None:
    starts = clip_starts(available, clip, max_clips, stride)
    step = clip if stride is None else stride
    assert len(starts) <= max_clips
    assert all(start + clip <= available for start in starts)
    assert starts == [i * step for i in range(len(starts))]
    # No room was left unused: one more clip would not fit or was not asked for.
    assert len(starts) == max_clips or len(starts) * step + clip > available


def test_latent_frames() -> None:
    assert [latent_frames(f) for f in (1, 5, 17, 93)] == [1, 2, 5, 24]
    with pytest.raises(ValueError):
        latent_frames(0)
