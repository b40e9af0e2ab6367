"""data.py: size and sampling rules worked by hand, patch order against a slow loop and against HF's own
code, video errors, JSONL errors, batching, and the per-rank prompt stream."""
import ast
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from config import DataConfig
from data import DataError, Record, VideoError

CLIPS = Path(__file__).parent / "data"
sys.path.insert(0, str(CLIPS))
import make_clips  # noqa: E402


# ----------------------------------------------------------------------------- rules worked by hand

@pytest.mark.parametrize("height, width, min_pixels, max_pixels, expected", [
    # round(64/28) = round(2.29) = 2 -> 56; 56*56 = 3136 is inside [3136, 100352]
    (64, 64, 3136, 100352, (56, 56)),
    # 64 -> 56; round(96/28) = round(3.43) = 3 -> 84; 56*84 = 4704
    (64, 96, 3136, 100352, (56, 84)),
    # 224 = 8*28 exactly; 224*224 = 50176 fits
    (224, 224, 3136, 100352, (224, 224)),
    # 360 -> 13*28 = 364, 640 -> 23*28 = 644; 364*644 = 234416 > 100352, so
    # beta = sqrt(360*640 / 100352) = sqrt(2.2959) = 1.5152; 360/1.5152 = 237.6 -> floor to 28: 224;
    # 640/1.5152 = 422.4 -> 420; 224*420 = 94080
    (360, 640, 3136, 100352, (224, 420)),
    (640, 360, 3136, 100352, (420, 224)),
    # 1080p has 360p's aspect: beta = sqrt(1080*1920 / 100352) = 4.5457; 1080/4.5457 = 237.6 -> 224,
    # 1920/4.5457 = 422.4 -> 420
    (1080, 1920, 3136, 100352, (224, 420)),
    # 1000 -> 36*28 = 1008; 1008^2 > 100352: beta = sqrt(1e6 / 100352) = 3.1567; 1000/3.1567 = 316.8 -> 308
    (1000, 1000, 3136, 100352, (308, 308)),
    # 20 -> round(0.71) = 1 -> 28, 30 -> round(1.07) = 1 -> 28; 784 < 3136, so beta = sqrt(3136 / 600) =
    # 2.2862; 20*2.2862 = 45.7 -> ceil to 28: 56; 30*2.2862 = 68.6 -> 84
    (20, 30, 3136, 100352, (56, 84)),
    # the floor never goes below one factor: 30 -> 28, 3000 -> 2996; beta = sqrt(90000 / 3136) = 5.357;
    # 30/5.357 = 5.6 -> floor 0 -> 28; 3000/5.357 = 560.0 -> 560
    (30, 3000, 784, 3136, (28, 560)),
])
def test_smart_resize_by_hand(height, width, min_pixels, max_pixels, expected):
    assert data.smart_resize(height, width, 28, min_pixels, max_pixels) == expected


def test_smart_resize_refuses_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        data.smart_resize(10, 2500)   # 250 > 200


@pytest.mark.parametrize("total, fps, overrides, expected", [
    # 16 frames at 8 fps = 2 s; 2 s * 2 fps = 4.0; clamp to [4, floor_2(min(16, 16)) = 16] -> 4
    (16, 8.0, {}, 4),
    # 2.5 s -> 5.0 -> floored to a multiple of 2: 4
    (20, 8.0, {}, 4),
    # 3 s -> 6
    (24, 8.0, {}, 6),
    # 3.5 s -> 7.0 -> 6 (qwen-vl-utils 0.0.8 rounded: 8)
    (28, 8.0, {}, 6),
    # the same 3.5 s at 30 fps (105 frames) -> 7.0 -> 6
    (105, 30.0, {}, 6),
    # 3.25 s -> 6.5 -> 6; 3.75 s -> 7.5 -> 6; 4 s -> 8
    (26, 8.0, {}, 6),
    (30, 8.0, {}, 6),
    (32, 8.0, {}, 8),
    # 9.33 s at 24 fps (224 frames) -> 18.7 -> clamped to max_frames 16
    (224, 24.0, {}, 16),
    # 30 s at 30 fps -> 60 -> clamped to max_frames 16
    (900, 30.0, {}, 16),
    # 15 s at 1 fps -> 30, but only 15 frames exist: hi = floor_2(min(16, 15)) = 14
    (15, 1.0, {}, 14),
    # 3 frames in 0.1 s -> 0.2 -> max(0.2, 4) = 4, but hi = floor_2(3) = 2 wins
    (3, 30.0, {}, 2),
    # min_frames 3 -> ceil_2 = 4, max_frames 9 -> floor_2 = 8; 10 s at 1 fps = 10 -> 8
    (300, 30.0, {"fps": 1.0, "min_frames": 3, "max_frames": 9}, 8),
    # 1 s at 1 fps = 1 -> raised to ceil_2(3) = 4
    (30, 30.0, {"fps": 1.0, "min_frames": 3, "max_frames": 9}, 4),
])
def test_frame_count_by_hand(total, fps, overrides, expected):
    assert data.frame_count(total, fps, DataConfig(**overrides)) == expected


def qwen_smart_nframes(total_frames, video_fps, fps, min_frames, max_frames):
    """qwen-vl-utils' smart_nframes (0.0.9 to 0.0.14) with fps, min_frames and max_frames given, written out
    in its order: min_frames rounded up and max_frames down to multiples of 2; duration * fps raised to the
    first, lowered to the second and to total_frames; then floored to a multiple of 2. A count outside
    [2, total_frames] raises."""
    low, high = 2 * math.ceil(min_frames / 2), 2 * math.floor(max_frames / 2)
    n = min(min(max(total_frames / video_fps * fps, low), high), total_frames)
    n = 2 * math.floor(n / 2)
    if not 2 <= n <= total_frames:
        raise ValueError(n)
    return n


@settings(max_examples=500, deadline=None)
@given(st.integers(2, 20000), st.floats(1.0, 120.0), st.floats(0.05, 8.0), st.integers(1, 32),
       st.integers(1, 64))
def test_frame_count_matches_qwen_vl_utils(total, video_fps, fps, min_frames, max_frames):
    cfg = DataConfig(fps=fps, min_frames=min_frames, max_frames=max_frames)
    try:
        expected = qwen_smart_nframes(total, video_fps, fps, min_frames, max_frames)
    except ValueError:
        with pytest.raises(ValueError):
            data.frame_count(total, video_fps, cfg)
        return
    assert data.frame_count(total, video_fps, cfg) == expected


# ----------------------------------------------------------------------------- patches

def reference_patches(frames, p, tp, m):
    """One patch at a time, in the documented order: for each temporal pair, each m x m block of patches
    row by row, each patch inside the block row by row; a patch is (C, tp, p, p) of normalised values."""
    x = frames.double() / 255
    if x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, -1, -1, -1)])
    mean, std = torch.tensor(data.CLIP_MEAN).double(), torch.tensor(data.CLIP_STD).double()
    x = (x - mean[:, None, None]) / std[:, None, None]
    t, h, w = x.shape[0] // tp, x.shape[2] // p, x.shape[3] // p
    rows = []
    for ti in range(t):
        for bh in range(h // m):
            for bw in range(w // m):
                for mh in range(m):
                    for mw in range(m):
                        y, xx = (bh * m + mh) * p, (bw * m + mw) * p
                        patch = x[ti * tp:(ti + 1) * tp, :, y:y + p, xx:xx + p]   # (tp, C, p, p)
                        rows.append(patch.transpose(0, 1).flatten())            # (C, tp, p, p) flattened
    return torch.stack(rows), [t, h, w]


@pytest.mark.parametrize("T, H, W", [(4, 56, 84), (3, 28, 56), (1, 56, 28)])
def test_video_to_patches_matches_reference_loop(T, H, W):
    frames = torch.randint(0, 256, (T, 3, H, W), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(T))
    pixels, grid = data.video_to_patches(frames)
    expected, expected_grid = reference_patches(frames, 14, 2, 2)
    assert grid.tolist() == expected_grid and pixels.dtype == torch.float32
    assert pixels.shape == (expected_grid[0] * expected_grid[1] * expected_grid[2], 3 * 2 * 14 * 14)
    torch.testing.assert_close(pixels.double(), expected, atol=1e-5, rtol=0)


def hf_qwen2_vl_function(name):
    """A function from the installed transformers' Qwen2-VL video processor. Its module imports torchvision,
    which cannot be installed here, so the processor itself cannot run: we compile just this function
    from its source, so that our code is checked against HF's code rather than against our reading of it."""
    import transformers
    path = Path(transformers.__file__).parent / "models" / "qwen2_vl" / "video_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def test_video_to_patches_matches_hf_patchify():
    patchify = hf_qwen2_vl_function("patchify")
    frames = torch.randint(0, 256, (5, 3, 56, 84), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(data.CLIP_MEAN) * 255, torch.tensor(data.CLIP_STD) * 255
    normalised = (frames.float() - mean[:, None, None]) / std[:, None, None]
    hf_pixels, t, h, w = patchify(None, normalised[None], patch_size=14, merge_size=2, temporal_patch_size=2)
    pixels, grid = data.video_to_patches(frames)
    assert grid.tolist() == [t, h, w] == [3, 4, 6]
    assert torch.equal(pixels, hf_pixels[0])


@settings(max_examples=300, deadline=None)
@given(st.integers(15, 4000), st.integers(15, 4000), st.integers(1, 512), st.integers(1, 4096))
def test_smart_resize_matches_hf(height, width, min_tokens, extra_tokens):
    if max(height, width) / min(height, width) > data.MAX_RATIO:
        return
    min_pixels, max_pixels = min_tokens * 28 * 28, (min_tokens + extra_tokens) * 28 * 28
    hf_smart_resize = hf_qwen2_vl_function("smart_resize")
    expected = hf_smart_resize(height, width, 28, min_pixels, max_pixels)
    assert data.smart_resize(height, width, 28, min_pixels, max_pixels) == expected


@pytest.mark.parametrize("height, width, n_frames, overrides, expected", [
    # defaults: the cap is max(min(602112, 90316800 / 16 * 2), int(3136 * 1.05)) = 602112, but the paper's
    # max_pixels 100352 is lower and binds: 1080p -> (224, 420) as in test_smart_resize_by_hand
    (1080, 1920, 16, {}, (224, 420)),
    # max_pixels at Qwen's image limit 16384*28*28: the per-frame cap 768*28*28 = 602112 binds.
    # beta = sqrt(1080*1920 / 602112) = 1.8558; 1080/1.8558 = 582.0 -> 560, 1920/1.8558 = 1034.6 -> 1008:
    # 720 tokens per pair of frames, where the uncapped (1092, 1932) below gives 2691
    (1080, 1920, 16, {"max_pixels": 16384 * 28 * 28}, (560, 1008)),
    (1080, 1920, 16, {"max_pixels": 16384 * 28 * 28, "video_max_pixels": 10 ** 9}, (1092, 1932)),
    # 600 frames share the clip's budget: 90316800 / 600 * 2 = 301056 (384*28*28) < 602112 binds.
    # beta = sqrt(1080*1920 / 301056) = 2.6245; 1080/2.6245 = 411.5 -> 392, 1920/2.6245 = 731.6 -> 728
    (1080, 1920, 600, {"max_pixels": 16384 * 28 * 28}, (392, 728)),
    # a share of 6000 / 6 * 2 = 2000 is raised to int(3136 * 1.05) = 3292: beta = sqrt(64*96 / 3292) = 1.366;
    # 64/1.366 = 46.9 -> 28, 96/1.366 = 70.3 -> 56
    (64, 96, 6, {"total_pixels": 6000}, (28, 56)),
    # video_max_pixels 4000: beta = sqrt(6144 / 4000) = 1.2394; 64/1.2394 = 51.6 -> 28, 96/1.2394 = 77.5 -> 56
    (64, 96, 6, {"video_max_pixels": 4000}, (28, 56)),
    # the cap is raised to int(1.05 * min_pixels) = 3292, the caller's max_pixels is not: 97x100 rounds to
    # 84x112 > 3200, beta = sqrt(97*100 / 3200) = 1.741; 97/1.741 = 55.7 -> 28, 100/1.741 = 57.4 -> 56
    # (with 3292: beta = 1.7165, 56.5 -> 56, 58.3 -> 56)
    (97, 100, 6, {"max_pixels": 3200}, (28, 56)),
])
def test_frame_size_by_hand(height, width, n_frames, overrides, expected):
    assert data.frame_size(height, width, n_frames, DataConfig(**overrides)) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(28, 4000), st.integers(28, 4000), st.integers(2, 768), st.integers(4, 256),
       st.integers(0, 20000), st.integers(1, 2000), st.integers(1, 2000))
def test_frame_size_matches_qwen_vl_utils(height, width, n_frames, min_tokens, extra_tokens, cap_tokens,
                                          budget):
    """qwen-vl-utils' fetch_video (0.0.9 to 0.0.14) written out, with HF's smart_resize: max_pixels is the
    caller's value lowered to max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR),
    int(min_pixels * 1.05))."""
    if max(height, width) / min(height, width) > data.MAX_RATIO:
        return
    cfg = DataConfig(min_pixels=min_tokens * 784, max_pixels=(min_tokens + extra_tokens) * 784,
                     video_max_pixels=cap_tokens * 784, total_pixels=budget * 784 * 100)
    limit = max(min(cfg.video_max_pixels, cfg.total_pixels / n_frames * 2), int(cfg.min_pixels * 1.05))
    smart_resize = hf_qwen2_vl_function("smart_resize")
    expected = smart_resize(height, width, 28, cfg.min_pixels, min(cfg.max_pixels, limit))
    assert data.frame_size(height, width, n_frames, cfg) == expected


def test_clip_constants_match_transformers():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    assert list(data.CLIP_MEAN) == list(OPENAI_CLIP_MEAN) and list(data.CLIP_STD) == list(OPENAI_CLIP_STD)


# ----------------------------------------------------------------------------- resize

def torchvision_resize(frames, height, width):
    """torchvision's resize(BICUBIC, antialias=True) of a uint8 tensor, as qwen-vl-utils calls it, written out
    from torchvision/transforms/_functional_tensor.py (resize, _cast_squeeze_in/_out): to float32,
    interpolate, clamp to 0..255, round, back to uint8."""
    x = torch.nn.functional.interpolate(frames.to(torch.float32), size=[height, width], mode="bicubic",
                                        align_corners=False, antialias=True)
    return torch.round(x.clamp(min=0, max=255)).to(torch.uint8)


def cubic(x, a=-0.5):
    """The bicubic kernel of antialiased resampling (PIL's and torch's, a = -0.5)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return a * (((x - 5) * x + 8) * x - 4) if x < 2 else 0.0


def resample_matrix(n_in, n_out):
    """(n_out, n_in) float64 weights of antialiased bicubic resampling, one output pixel at a time: centre
    (i + 0.5) * scale in input coordinates; the kernel stretched by the scale when shrinking (support
    2 * scale), taps int(centre -/+ support + 0.5) cut at the borders, weights normalised to sum 1."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), n_in)
        w = [cubic((j - centre + 0.5) / stretch) for j in range(lo, hi)]
        m[i, lo:hi] = torch.tensor(w, dtype=torch.float64) / sum(w)
    return m


def test_resize_by_hand():
    # 2x2 -> 4x4 (scale 1/2, no stretch). Output 0 sits at input 0.25 and takes inputs 0, 1 at distances 0.25,
    # 1.25: cubic = 0.8671875, -0.0703125, normalised 1.0882, -0.0882. Output 1 sits at 0.75: distances 0.75,
    # 0.25: 0.2265625, 0.8671875 -> 0.2071, 0.7929 (in the order input 1, input 0); outputs 2, 3 mirror 1, 0.
    # Pixel (1, 0) of [[0, 255], [255, 0]] = 255 * (0.7929 * -0.0882 + 0.2071 * 1.0882) = 39.64 -> 40.
    # Torch's uint8 kernel rounds and clamps between its passes: the row pass gives -22.5 -> 0 at (0, 0) and
    # 255 at (1, 0), then 0.7929 * 0 + 0.2071 * 255 = 52.8 -> 53, 13 grey levels away.
    checker = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8).expand(1, 3, 2, 2)
    expected = [[0, 40, 215, 255], [40, 84, 171, 215], [215, 171, 84, 40], [255, 215, 40, 0]]
    assert data.resize_frames(checker, 4, 4)[0, 0].tolist() == expected
    # 1x4 -> 1x2 (scale 2, kernel stretched to support 4): output 0 sits at 1.0 and weighs inputs 0..3 at
    # distances 0.25, 0.25, 0.75, 1.25: 0.8672, 0.8672, 0.2266, -0.0703 (sum 1.8906);
    # 255 * (0.2266 - 0.0703) / 1.8906 = 21.07 -> 21, and by symmetry 233.93 -> 234
    step = torch.tensor([0, 0, 255, 255], dtype=torch.uint8).expand(1, 3, 1, 4)
    assert data.resize_frames(step, 1, 2)[0, 0].tolist() == [[21, 234]]
    # the 2x2 image's row [0, 255] -> 4 wide overshoots to -22.5 and 277.5: clamped to 0 and 255
    assert data.resize_frames(checker[..., :1, :], 1, 4)[0, 0].tolist() == [[0, 53, 202, 255]]


@pytest.mark.parametrize("T, H, W, height, width", [(2, 64, 96, 56, 84), (1, 17, 23, 28, 56),
                                                      (3, 100, 60, 28, 28), (1, 360, 640, 224, 420)])
def test_resize_matches_torchvision_and_a_slow_reference(T, H, W, height, width):
    frames = torch.randint(0, 256, (T, 3, H, W), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(H))
    ours = data.resize_frames(frames, height, width)
    assert ours.dtype == torch.uint8 and torch.equal(ours, torchvision_resize(frames, height, width))
    # float64 separable resampling: equal after rounding, except within float32 noise (< 0.01 here) of a
    # .5 tie
    slow = resample_matrix(H, height) @ frames.double() @ resample_matrix(W, width).T  # (T, 3, height, width)
    slow = slow.clamp(0, 255)
    near_tie = ((slow - slow.floor()) - 0.5).abs() < 0.01
    assert (ours.double() - slow).abs().max() <= 0.5 + 0.01
    assert torch.equal(ours.double()[~near_tie], slow.round()[~near_tie]) and near_tie.float().mean() < 0.05


def test_resize_leaves_frames_at_the_size_alone():
    frames = torch.randint(0, 256, (2, 3, 28, 56), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    assert data.resize_frames(frames, 28, 56) is frames


# ----------------------------------------------------------------------------- videos

SHIPPED = data.load_records(CLIPS / "train.jsonl")


def test_shipped_set_is_valid():
    assert 8 <= len(SHIPPED) <= 16
    assert sorted(r.video for r in SHIPPED) == sorted(str(p) for p in CLIPS.glob("*.mp4"))
    assert all(r.subjects and r.events for r in SHIPPED)


@pytest.mark.parametrize("record", SHIPPED, ids=[r.id for r in SHIPPED])
def test_shipped_clip_reads_and_shows_its_colours(record):
    import decord
    reader = decord.VideoReader(record.video)
    assert 16 <= len(reader) <= 24 and reader.get_avg_fps() == 8.0
    frames, fps = data.read_video(record.video, DataConfig())
    n = data.frame_count(len(reader), 8.0, DataConfig())
    assert frames.dtype == torch.uint8 and frames.shape == (n, 3, 56, frames.shape[3])
    assert fps == pytest.approx(n / len(reader) * 8.0)
    # every colour word in the ground truth is drawn: some full-rate pixel is near that colour
    video = torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy()).view(-1, 1, 3).float()
    words = {w for s in record.subjects for a in s["attributes"] + [s["name"]] for w in a.split()}
    for colour in words & set(make_clips.COLOURS):
        distance = (video - torch.tensor(make_clips.COLOURS[colour]).float()).norm(dim=-1).min()
        assert distance < 60, f"{record.id}: no {colour} pixel"


@pytest.mark.parametrize("record", SHIPPED, ids=[r.id for r in SHIPPED])
def test_shipped_clip_follows_qwens_recipe(record, tiny_tokenizer):
    """read_video and encode on a shipped clip against Qwen's recipe written out: qwen-vl-utils' frame count
    and frame indices, the size, torchvision's resize; then HF's patchify of the CLIP-normalised frames."""
    import decord
    reader = decord.VideoReader(record.video)
    total = len(reader)                              # 16, 20 or 24 frames at 8 fps: 2, 2.5 or 3 s
    n = qwen_smart_nframes(total, 8.0, 2.0, 4, 16)   # 4, 5 -> 4, 6
    assert n == {16: 4, 20: 4, 24: 6}[total]
    indices = torch.linspace(0, total - 1, n).round().long().tolist()
    raw = torch.from_numpy(reader.get_batch(indices).asnumpy())
    raw = raw.permute(0, 3, 1, 2)                    # (n, 3, 64, W0)
    # 64 -> round(64/28) * 28 = 56, 96 -> 84; 56*84 = 4704 is inside [3136, 100352]
    height, width = {64: (56, 56), 96: (56, 84)}[raw.shape[3]]
    expected = torchvision_resize(raw, height, width)
    frames, fps = data.read_video(record.video, DataConfig())
    assert torch.equal(frames, expected) and fps == n / total * 8.0
    prompt = data.encode(record.video, "Describe.", tiny_tokenizer, DataConfig(), "qwen2_vl")
    mean, std = torch.tensor(data.CLIP_MEAN) * 255, torch.tensor(data.CLIP_STD) * 255
    # HF's fused rescale + normalize
    normalised = (expected.float() - mean[:, None, None]) / std[:, None, None]
    hf_pixels, t, h, w = hf_qwen2_vl_function("patchify")(None, normalised[None], patch_size=14, merge_size=2,
                                                          temporal_patch_size=2)
    assert prompt["video_grid_thw"].tolist() == [[t, h, w]] == [[n // 2, height // 14, width // 14]]
    assert torch.equal(prompt["pixel_values_videos"], hf_pixels[0])


def test_per_frame_cap_on_a_shipped_clip():
    # red_and_blue_pass: 6 frames of 64x96; video_max_pixels 4000 -> (28, 56) as in test_frame_size_by_hand
    frames, _ = data.read_video(str(CLIPS / "red_and_blue_pass.mp4"), DataConfig(video_max_pixels=4000))
    assert frames.shape == (6, 3, 28, 56)


def test_total_pixel_budget_caps_frame_size():
    # red_and_blue_pass: 24 frames at 8 fps -> 6 frames of 64x96. total_pixels 6000 gives each frame
    # 6000 / 6 * 2 = 2000 pixels, raised to int(3136 * 1.05) = 3292. smart_resize(64, 96, max 3292):
    # 56*84 > 3292, beta = sqrt(6144 / 3292) = 1.366; 64/1.366 = 46.9 -> 28, 96/1.366 = 70.3 -> 56
    frames, _ = data.read_video(str(CLIPS / "red_and_blue_pass.mp4"), DataConfig(total_pixels=6000))
    assert frames.shape == (6, 3, 28, 56)


def bad_videos(tmp_path):
    cases = {"missing": tmp_path / "missing.mp4", "text": tmp_path / "notes.mp4",
             "one_frame": tmp_path / "one_frame.mp4", "empty": tmp_path / "empty.mp4"}
    cases["text"].write_text("this is a text file, not a video\n")
    cases["empty"].write_bytes(b"")
    make_clips.write_mp4(str(cases["one_frame"]), make_clips.render(64, 64, 2, lambda im, s: None)[:1])
    # cuts through the frames of both layouts: index last (as shipped; the cut loses the index) and index
    # first (the cut loses frames the index lists). A cut of only the trailing metadata (the last ~2%
    # of a shipped clip) leaves every frame decodable and is not an error.
    width, height, frames, draw, _ = make_clips.CLIPS["red_square_right"]
    make_clips.write_mp4(str(tmp_path / "faststart.mp4"), make_clips.render(width, height, frames, draw),
                         True)
    for layout, clip in (("shipped", CLIPS / "red_square_right.mp4"),
                         ("faststart", tmp_path / "faststart.mp4")):
        full = clip.read_bytes()
        for frac in (0.3, 0.6, 0.9):
            cases[f"{layout}_cut_{frac}"] = tmp_path / f"{layout}_cut_{frac}.mp4"
            cases[f"{layout}_cut_{frac}"].write_bytes(full[:int(len(full) * frac)])
    return cases


def test_bad_videos_raise_video_error_naming_the_file(tmp_path):
    for name, path in bad_videos(tmp_path).items():
        with pytest.raises(VideoError) as info:
            data.read_video(str(path), DataConfig())
        assert str(info.value).startswith(f"{path}: "), name
    with pytest.raises(VideoError, match="1 frame"):
        data.read_video(str(tmp_path / "one_frame.mp4"), DataConfig())


# ----------------------------------------------------------------------------- the JSONL

def write_jsonl(tmp_path, lines):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


GOOD = {"video": "a.mp4", "caption": "A red square moves."}


def test_load_records_resolves_paths_and_ids(tmp_path):
    subjects = [{"name": "square", "attributes": ["red"], "actions": []}]
    path = write_jsonl(tmp_path, [GOOD, "", {**GOOD, "id": "x", "video": "/abs/b.mp4", "events": ["e"],
                                             "subjects": subjects}])
    a, b = data.load_records(path)
    assert (a.id, a.video, a.subjects, a.events) == ("train:1", str(tmp_path / "a.mp4"), None, None)
    assert (b.id, b.video, b.events) == ("x", "/abs/b.mp4", ["e"])


@pytest.mark.parametrize("bad, line, message", [
    ('{"video": "a.mp4", "caption": ', 2, "not valid JSON"),
    ('["a.mp4"]', 2, "expected a JSON object"),
    ({"video": "a.mp4"}, 2, "missing required field 'caption'"),
    ({**GOOD, "caption": 5}, 2, "'caption' must be a non-empty string"),
    ({**GOOD, "id": 7}, 2, "'id' must be a non-empty string"),
    ({**GOOD, "events": "one event"}, 2, "'events' must be a list of strings"),
    ({**GOOD, "subjects": [{"name": "man", "attributes": "tall", "actions": []}]}, 2,
     "subjects[0].attributes must be a list"),
    ({**GOOD, "subjects": [{"name": "man", "attributes": []}]}, 2, "subjects[0] lacks actions"),
    ({**GOOD, "subject": []}, 2, "unknown key 'subject'; did you mean 'subjects'?"),
    ({**GOOD, "id": "train:1"}, 2, "duplicate id 'train:1' (first on line 1)"),
])
def test_load_records_errors_cite_file_and_line(tmp_path, bad, line, message):
    path = write_jsonl(tmp_path, [GOOD, bad])
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(message)):
        data.load_records(path)


def test_a_long_id_is_cut_in_the_message(tmp_path):
    huge = "v" * 4_000_000
    path = write_jsonl(tmp_path, [{**GOOD, "id": huge}, {**GOOD, "id": huge}])
    with pytest.raises(DataError) as error:
        data.load_records(path)
    assert str(error.value).startswith(f"{path}:2: duplicate id 'vvv") and len(str(error.value)) < 300
    assert "(4,000,000 characters) (first on line 1)" in str(error.value)
    with pytest.raises(data.VideoError) as error:  # a benchmark's video path made from such an id
        data.read_video(str(tmp_path / f"{huge}.mp4"), DataConfig())
    assert str(error.value).endswith(" characters): no such file") and len(str(error.value)) < 1100


def test_targets_over_max_target_tokens(tmp_path, tiny_tokenizer):
    """Counted in the model's tokens (here the byte-level tokenizer: one token a byte, <|im_end|> one), the
    think target or the caption alone; a target far over the limit is counted as "N+" without tokenising all
    of it; the first record over is named by FILE:LINE with how many there are."""
    subjects = [{"name": "man", "attributes": [], "actions": []}]
    path = write_jsonl(tmp_path, [{**GOOD, "caption": "a" * 40, "subjects": subjects},
                                  {**GOOD, "caption": "b" * 200, "subjects": subjects},
                                  {**GOOD, "caption": "c" * 1_000_000, "subjects": subjects}])
    records = data.load_records(path)
    think = len(data.target_text(records[0], "think").encode()) + 1  # 40 + the think block + <|im_end|>
    # the 1 MB caption: only its first 32 * (limit + 2) characters are tokenised
    assert data.target_lengths(records, tiny_tokenizer, "caption", 41) == {1: "201", 2: f"{32 * 43 - 1:,}+"}
    assert data.target_lengths(records, tiny_tokenizer, "think", think) == {1: f"{think + 160}",
                                                                            2: f"{32 * (think + 2) - 1:,}+"}
    assert data.target_lengths(records, tiny_tokenizer, "think", think - 1) == {
        0: f"{think}", 1: f"{think + 160}", 2: f"{32 * (think + 1) - 1:,}+"}
    message = (f"{path}:2: the target (the caption) is 201 tokens, over data.max_target_tokens=41 (2 records "
               f"in all: python prepare.py --check {path} lists them); shorten the caption")
    with pytest.raises(DataError, match=re.escape(message)):
        data.check_targets(records, tiny_tokenizer, "caption", 41, path)
    data.check_targets(records[:1], tiny_tokenizer, "caption", 41, path)


def test_fields_the_rewards_need_are_required_at_load_time(tmp_path):
    # null means absent, which prepare.py fills in; a run whose rewards need the field stops at load time,
    # naming the record, instead of in the middle of training (think_score raised without a name)
    import rewards
    from config import RewardConfig
    path = write_jsonl(tmp_path, [GOOD, {**GOOD, "subjects": None}])
    assert [r.subjects for r in data.load_records(path)] == [None, None]
    need = rewards.required_fields(RewardConfig())
    assert need == {"subjects": "reward.think_weight=1.0 (Tscore)"}
    assert rewards.required_fields(RewardConfig(think_weight=0)) == {}
    with pytest.raises(DataError, match=re.escape(f"{path}:1: no 'subjects' (absent or null), which "
                                                  "reward.think_weight=1.0 (Tscore) needs: run python "
                                                  "prepare.py")):
        data.load_records(path, need)


def test_grpo_stops_at_load_on_a_record_without_subjects(tmp_path):
    import grpo
    from config import load_config
    clip = {"video": str(CLIPS / "red_square_right.mp4"), "caption": "A red square moves.", "subjects": None}
    # enough for a step: the old code crashed in it, naming no record
    path = write_jsonl(tmp_path, [clip, clip])
    cfg = load_config(str(CLIPS.parent / "tiny.yaml"),
                      [f"data.train={path}", f"model.path={tmp_path / 'm'}",
                       f"train.out_dir={tmp_path / 'run'}", "train.warm_start=false"])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: no 'subjects'")):
        grpo.train(cfg)
    assert not (tmp_path / "m").exists()  # before any model was built


def test_load_records_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no records"):
        data.load_records(write_jsonl(tmp_path, [""]))


# ----------------------------------------------------------------------------- prompts and batches

@pytest.fixture(scope="module")
def two_prompts(tiny_tokenizer):
    """Prompts of two clips of different sizes: 64x64 (grid 2x4x4) and 64x96 (grid 3x4x6)."""
    return [data.encode(str(CLIPS / name), "Describe the video.", tiny_tokenizer, DataConfig(), "qwen2_vl")
            for name in ("red_square_right.mp4", "red_and_blue_pass.mp4")]


def test_encode_builds_qwen_inputs(two_prompts, tiny_tokenizer):
    tid = tiny_tokenizer.convert_tokens_to_ids
    for p, grid, fps in zip(two_prompts, ([2, 4, 4], [3, 4, 6]), (4 / 16 * 8, 6 / 24 * 8)):
        ids = p["input_ids"].tolist()
        assert p["video_grid_thw"].tolist() == [grid]
        assert p["pixel_values_videos"].shape == (math.prod(grid), 1176)
        n = math.prod(grid) // 4                        # t*h*w / merge_size^2 tokens
        start = ids.index(tid("<|vision_start|>"))
        assert ids[start + 1:start + 1 + n] == [tid("<|video_pad|>")] * n
        assert ids[start + 1 + n] == tid("<|vision_end|>")
        assert ids.count(tid("<|video_pad|>")) == n
        assert p["mm_token_type_ids"].tolist() == [2 if i == tid("<|video_pad|>") else 0 for i in ids]
        assert p["attention_mask"].tolist() == [1] * len(ids)
        assert p["second_per_grid_ts"].tolist() == [pytest.approx(2 / fps)]
        text = tiny_tokenizer.decode(ids)
        assert text.endswith("Describe the video.<|im_end|>\n<|im_start|>assistant\n")


def test_encode_takes_the_vision_config_and_the_length_cap(tiny_tokenizer):
    video = str(CLIPS / "red_square_right.mp4")
    vision = SimpleNamespace(patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    p = data.encode(video, "Hi.", tiny_tokenizer, DataConfig(), "qwen2_5_vl", vision)
    with pytest.raises(DataError, match=re.escape(f"{video}: the prompt is {len(p['input_ids'])} tokens")):
        data.encode(video, "Hi.", tiny_tokenizer, DataConfig(max_prompt_tokens=20), "qwen2_5_vl", vision)


def test_collate_left_pads(two_prompts):
    a, b = two_prompts
    batch = data.collate([a, b], pad_id=-1)
    L, short = len(b["input_ids"]), len(a["input_ids"])
    pad = L - short
    assert pad > 0 and batch["input_ids"].shape == (2, L)
    assert batch["input_ids"][0].tolist() == [-1] * pad + a["input_ids"].tolist()
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * short
    assert batch["mm_token_type_ids"][0].tolist() == [0] * pad + a["mm_token_type_ids"].tolist()
    assert torch.equal(batch["input_ids"][1], b["input_ids"])
    assert torch.equal(batch["pixel_values_videos"],
                       torch.cat([a["pixel_values_videos"], b["pixel_values_videos"]]))
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [3, 4, 6]]
    assert batch["second_per_grid_ts"].shape == (2,)


def test_repeat_batch_keeps_each_rows_pixels(two_prompts):
    batch = data.collate(two_prompts, pad_id=0)
    rows = data.repeat_batch(batch, 3)
    assert rows["input_ids"].shape == (6, batch["input_ids"].shape[1])
    expected_pixels = []
    for r in range(6):
        b = r // 3                                      # row b*n+k is prompt b
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw",
                    "second_per_grid_ts"):
            assert torch.equal(rows[key][r], batch[key][b]), key
        expected_pixels.append(two_prompts[b]["pixel_values_videos"])
    assert torch.equal(rows["pixel_values_videos"], torch.cat(expected_pixels))
    picked = data.select_rows(batch, torch.tensor([1, 0, 1]))
    assert torch.equal(picked["pixel_values_videos"], torch.cat([two_prompts[i]["pixel_values_videos"]
                                                                 for i in (1, 0, 1)]))


# ----------------------------------------------------------------------------- the prompt stream

def fake_records(n, bad=()):
    return [Record(id=str(i), video=f"bad{i}.mp4" if i in bad else f"v{i}.mp4", caption="c", subjects=None,
                   events=None) for i in range(n)]


def fake_encode(record):
    if record.video.startswith("bad"):
        raise VideoError(f"{record.video}: unreadable")
    return {"index": int(record.id)}


def stream(records, rank=0, world=1, per_rank=1, shuffle=True, max_bad=0.5, seed=3):
    return data.PromptStream(records, fake_encode, rank, world, seed, per_rank, shuffle, max_bad)


def take(s, steps):
    return [[p["index"] for _, p in s.next()] for _ in range(steps)]


@pytest.mark.parametrize("n, world, per_rank", [(12, 3, 2), (13, 3, 2), (7, 2, 1), (5, 1, 5)])
def test_rank_slices_are_disjoint_and_cover_the_epoch(n, world, per_rank):
    records = fake_records(n)
    streams = [stream(records, r, world, per_rank) for r in range(world)]
    steps = streams[0].steps_per_epoch()
    assert steps == n // (world * per_rank) and all(s.steps_per_epoch() == steps for s in streams)
    seen = [sum(take(s, steps), []) for s in streams]
    flat = sum(seen, [])
    # disjoint; the n % (world * per_rank) records left over wait for a later epoch's order
    assert len(flat) == len(set(flat)) == steps * world * per_rank
    assert all(s.epoch == 0 for s in streams)
    again = [sum(take(s, steps), []) for s in streams]             # epoch 1: a new order, same rule
    assert all(s.epoch == 1 for s in streams) and len(set(sum(again, []))) == len(flat)
    if n % (world * per_rank) == 0:
        assert sorted(flat) == list(range(n))


def test_order_is_seeded_and_identity_without_shuffle():
    records = fake_records(10)
    assert take(stream(records), 10) == take(stream(records), 10)
    assert take(stream(records), 10) != take(stream(records, seed=4), 10)
    assert take(stream(records, shuffle=False), 12) == [[i] for i in range(10)] + [[0], [1]]


def test_state_dict_resumes_exactly():
    records = fake_records(11, bad={2, 7})
    a = stream(records, rank=1, world=2, per_rank=2)
    take(a, 4)                                          # across the epoch boundary (2 steps per epoch)
    state = json.loads(json.dumps(a.state_dict()))     # survives a round trip through a file
    expected = take(a, 5)
    b = stream(records, rank=1, world=2, per_rank=2)
    b.load_state_dict(state)
    assert take(b, 5) == expected
    assert (b.epoch, b.consumed, b.bad, b.seen, b.warned) == (a.epoch, a.consumed, a.bad, a.seen, a.warned)
    with pytest.raises(DataError, match="saved data position"):
        stream(records, rank=1, world=2, per_rank=2, seed=4).load_state_dict(state)


def test_bad_videos_are_skipped_counted_and_warned_once(capsys):
    s = stream(fake_records(4, bad={1}), shuffle=False)
    assert take(s, 8) == [[0], [2], [2], [3]] * 2       # item 1's slot goes to the next item, 2
    assert (s.bad, s.seen) == (2, 10)
    assert capsys.readouterr().err.count("bad1.mp4: unreadable") == 1


def test_too_many_bad_videos_stop_the_run():
    s = stream(fake_records(40, bad=set(range(0, 40, 3))), max_bad=0.1)
    with pytest.raises(DataError, match=r"could not be read, more than data.max_bad_fraction=0.1"):
        take(s, 40)
    assert s.seen >= 20
    with pytest.raises(DataError, match="no video"):
        take(stream(fake_records(3, bad={0, 1, 2}), max_bad=1.0), 1)


def test_too_few_records_for_one_step():
    with pytest.raises(DataError, match="cannot fill one step"):
        stream(fake_records(3), world=2, per_rank=2)
