"""Regenerate the shipped test clips and their ground truth: tests/data/*.mp4 and train.jsonl.

    python tests/data/make_clips.py

Each clip is a few coloured shapes moving on a black background, 8 fps, MPEG-4 Part 2 in MP4, a few KB.
The captions, subjects and events in train.jsonl describe exactly what is drawn: the script is
the single source of both. Output is deterministic (fixed drawing, FFmpeg's own MPEG-4 encoder in
bitexact mode, no timestamps in the container), so rerunning it leaves the files byte-identical on one
machine; libx264 was not: about one run in twenty changed a clip's bytes, even single-threaded.
PyAV is a test-only dependency (requirements-test.txt).
"""
import json
import os

import av
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FPS = 8
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 240), "yellow": (240, 220, 30),
           "white": (240, 240, 240), "cyan": (30, 220, 220), "magenta": (220, 40, 220), "orange": (250, 140, 20)}


def lerp(a, b, s):
    return a + (b - a) * s


def square(img, colour, cx, cy, r):
    """Fill the axis-aligned square of half-side r centred at (cx, cy); nothing when r < 0."""
    h, w, _ = img.shape
    y, x = np.mgrid[0:h, 0:w]
    img[(abs(x - cx) <= r) & (abs(y - cy) <= r)] = COLOURS[colour]


def circle(img, colour, cx, cy, r):
    h, w, _ = img.shape
    y, x = np.mgrid[0:h, 0:w]
    img[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = COLOURS[colour]


def triangle(img, colour, cx, cy, r):
    """An upward-pointing triangle: apex at (cx, cy - r), base on y = cy + r."""
    h, w, _ = img.shape
    y, x = np.mgrid[0:h, 0:w]
    inside = (y <= cy + r) & (abs(x - cx) <= (y - (cy - r)) / 2)
    img[inside] = COLOURS[colour]


# name -> (width, height, frames, draw(img, s) with s in [0, 1] over the clip, ground truth)
CLIPS = {
    "red_square_right": (64, 64, 16, lambda im, s: square(im, "red", lerp(10, 53, s), 32, 7), dict(
        caption="On a black background, a small red square moves from the left side to the right side.",
        subjects=[{"name": "square", "attributes": ["red", "small"], "actions": ["moves from left to right"]}],
        events=["A red square moves from the left side to the right side."])),
    "blue_circle_grows": (64, 64, 20, lambda im, s: circle(im, "blue", 32, 32, lerp(4, 26, s)), dict(
        caption="A blue circle in the centre of a black frame grows from a small dot until it fills most "
                "of the frame.",
        subjects=[{"name": "circle", "attributes": ["blue", "in the centre"], "actions": ["grows larger"]}],
        events=["A blue circle grows larger in the centre of the frame."])),
    "green_triangle_falls": (64, 64, 16, lambda im, s: triangle(im, "green", 32, lerp(10, 53, s), 9), dict(
        caption="A green triangle falls from the top of the black frame to the bottom.",
        subjects=[{"name": "triangle", "attributes": ["green"], "actions": ["falls from top to bottom"]}],
        events=["A green triangle moves from the top to the bottom of the frame."])),
    "yellow_square_rises": (64, 64, 24, lambda im, s: square(im, "yellow", 32, lerp(54, 10, s), 6), dict(
        caption="A small yellow square rises from the bottom of the black frame to the top.",
        subjects=[{"name": "square", "attributes": ["yellow", "small"], "actions": ["rises from bottom to top"]}],
        events=["A yellow square moves from the bottom to the top of the frame."])),
    "white_circle_shrinks": (64, 64, 16, lambda im, s: circle(im, "white", 32, 32, lerp(26, 3, s)), dict(
        caption="A large white circle in the middle of a black frame shrinks until it is a tiny dot.",
        subjects=[{"name": "circle", "attributes": ["white", "large", "in the middle"], "actions": ["shrinks"]}],
        events=["A white circle shrinks to a tiny dot."])),
    "magenta_square_diagonal": (64, 64, 20, lambda im, s: square(im, "magenta", lerp(9, 55, s), lerp(9, 55, s), 6),
                                dict(
        caption="A magenta square moves diagonally from the top left corner to the bottom right corner "
                "of a black frame.",
        subjects=[{"name": "square", "attributes": ["magenta"],
                   "actions": ["moves diagonally from top left to bottom right"]}],
        events=["A magenta square moves from the top left corner to the bottom right corner."])),
    "cyan_circle_bounces": (64, 64, 24, lambda im, s: circle(im, "cyan", 32, lerp(10, 54, 1 - abs(2 * s - 1)), 8),
                            dict(
        caption="A cyan ball drops from the top of the black frame to the bottom and bounces back up to the top.",
        subjects=[{"name": "ball", "attributes": ["cyan", "round"],
                   "actions": ["drops to the bottom", "bounces back up"]}],
        events=["A cyan ball falls to the bottom of the frame.", "The cyan ball bounces back up to the top."])),
    "square_turns_blue": (64, 64, 16, lambda im, s: square(im, "red" if s < 0.5 else "blue", 32, 32, 12), dict(
        caption="A square stays still in the middle of a black frame; it is red at first and then turns blue.",
        subjects=[{"name": "square", "attributes": ["red", "then blue", "in the middle"],
                   "actions": ["stays still", "changes colour from red to blue"]}],
        events=["A red square sits in the middle of the frame.", "The square changes colour from red to blue."])),
    "red_and_blue_pass": (96, 64, 24, lambda im, s: (square(im, "red", lerp(10, 85, s), 20, 7),
                                                     circle(im, "blue", lerp(85, 10, s), 44, 8)), dict(
        caption="In a wide black frame, a red square moves from left to right along the top while a blue circle "
                "moves from right to left along the bottom, and they pass each other in the middle.",
        subjects=[{"name": "square", "attributes": ["red"], "actions": ["moves from left to right"]},
                  {"name": "circle", "attributes": ["blue"], "actions": ["moves from right to left"]}],
        events=["A red square moves from left to right.", "A blue circle moves from right to left.",
                "The square and the circle pass each other in the middle."])),
    "two_circles_meet": (96, 64, 20, lambda im, s: (circle(im, "orange", lerp(10, 38, s), 32, 9),
                                                    circle(im, "green", lerp(86, 58, s), 32, 9)), dict(
        caption="An orange circle on the left and a green circle on the right move toward each other and meet "
                "in the middle of a wide black frame.",
        subjects=[{"name": "orange circle", "attributes": ["orange", "on the left"],
                   "actions": ["moves to the right"]},
                  {"name": "green circle", "attributes": ["green", "on the right"],
                   "actions": ["moves to the left"]}],
        events=["An orange circle and a green circle move toward each other.",
                "The two circles meet in the middle of the frame."])),
    "still_square_moving_ball": (64, 64, 16, lambda im, s: (square(im, "green", 32, 14, 8),
                                                            circle(im, "yellow", lerp(8, 56, s), 48, 6)), dict(
        caption="A green square stays still at the top of a black frame while a small yellow ball rolls from "
                "left to right below it.",
        subjects=[{"name": "square", "attributes": ["green", "at the top"], "actions": ["stays still"]},
                  {"name": "ball", "attributes": ["yellow", "small"], "actions": ["rolls from left to right"]}],
        events=["A green square stays at the top of the frame.", "A yellow ball rolls from left to right."])),
    "blue_square_appears": (64, 64, 16, lambda im, s: square(im, "blue", 32, 32, 10 if s >= 0.5 else -1),
                            dict(
        caption="A black frame is empty at first; halfway through, a blue square suddenly appears in the middle.",
        subjects=[{"name": "square", "attributes": ["blue", "in the middle"], "actions": ["appears suddenly"]}],
        events=["The frame is empty at first.", "A blue square appears in the middle."])),
}


# Held-out clips (tests/data/heldout): new combinations of the same shapes, colours and motions, never trained
# on. The demo scores its warm-start and GRPO models on them (`python evaluate.py demo.yaml`), laid out as the
# official DREAM-1K file is: tarsier's JSONL with integer vids and <vid>.mp4 videos, plus our subjects in
# extra_info for Tscore; val.jsonl holds the same clips in the training layout (train.eval_every).
HELD_OUT = {
    "orange_square_left": (64, 64, 16, lambda im, s: square(im, "orange", lerp(53, 10, s), 32, 7), dict(
        caption="On a black background, a small orange square moves from the right side to the left side.",
        subjects=[{"name": "square", "attributes": ["orange", "small"], "actions": ["moves from right to left"]}],
        events=["An orange square moves from the right side to the left side."])),
    "yellow_circle_grows": (64, 64, 20, lambda im, s: circle(im, "yellow", 32, 32, lerp(4, 26, s)), dict(
        caption="A yellow circle in the centre of a black frame grows from a small dot until it fills most "
                "of the frame.",
        subjects=[{"name": "circle", "attributes": ["yellow", "in the centre"], "actions": ["grows larger"]}],
        events=["A yellow circle grows larger in the centre of the frame."])),
    "red_triangle_falls": (64, 64, 16, lambda im, s: triangle(im, "red", 32, lerp(10, 53, s), 9), dict(
        caption="A red triangle falls from the top of the black frame to the bottom.",
        subjects=[{"name": "triangle", "attributes": ["red"], "actions": ["falls from top to bottom"]}],
        events=["A red triangle moves from the top to the bottom of the frame."])),
    "green_circle_shrinks": (64, 64, 16, lambda im, s: circle(im, "green", 32, 32, lerp(26, 3, s)), dict(
        caption="A large green circle in the middle of a black frame shrinks until it is a tiny dot.",
        subjects=[{"name": "circle", "attributes": ["green", "large", "in the middle"], "actions": ["shrinks"]}],
        events=["A green circle shrinks to a tiny dot."])),
}


def render(width, height, frames, draw):
    """(frames, height, width, 3) uint8, black, then frame i drawn on at s = i / (frames - 1)."""
    out = np.zeros((frames, height, width, 3), np.uint8)
    for i in range(frames):
        draw(out[i], i / (frames - 1))
    return out


def write_mp4(path, video, faststart=False):
    """MPEG-4 Part 2, yuv420p at FPS, bitexact and without timestamps, so the bytes are reproducible.
    faststart puts the index (moov) before the frames, as streamed files have it: a cut then loses frames
    rather than the index (the tests truncate both layouts)."""
    options = {"fflags": "+bitexact", **({"movflags": "+faststart"} if faststart else {})}
    with av.open(path, "w", format="mp4", options=options) as container:
        stream = container.add_stream("mpeg4", rate=FPS, options={"qscale": "4", "flags": "+bitexact"})
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        for i, rgb in enumerate(video):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i      # in the stream's time base, 1/FPS
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def main():
    lines = []
    for name, (width, height, frames, draw, truth) in CLIPS.items():
        write_mp4(os.path.join(HERE, f"{name}.mp4"), render(width, height, frames, draw))
        lines.append(json.dumps({"id": name, "video": f"{name}.mp4", **truth}))
    with open(os.path.join(HERE, "train.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    held_out = os.path.join(HERE, "heldout")
    os.makedirs(held_out, exist_ok=True)
    dream, val = [], []
    for vid, (name, (width, height, frames, draw, truth)) in enumerate(HELD_OUT.items(), 1):
        write_mp4(os.path.join(held_out, f"{vid}.mp4"), render(width, height, frames, draw))
        dream.append(json.dumps({
            "messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": f"{vid}.mp4"}},
                                                      {"type": "text", "text": "Describe the video in detail."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "",
                                                            "reference": truth["caption"]}]}],
            "dataset": "DREAM/shapes", "task": "video/caption", "idx": vid, "vid": vid,
            "extra_info": {"duration": frames / FPS, "events": truth["events"], "n_events": len(truth["events"]),
                           "subjects": truth["subjects"]}}))
        val.append(json.dumps({"id": name, "video": f"{vid}.mp4", **truth}))
    with open(os.path.join(held_out, "DREAM-1k.jsonl"), "w") as f:
        f.write("\n".join(dream) + "\n")
    with open(os.path.join(held_out, "val.jsonl"), "w") as f:
        f.write("\n".join(val) + "\n")
    print(f"wrote {len(CLIPS)} clips and train.jsonl to {HERE}, {len(HELD_OUT)} held-out clips, DREAM-1k.jsonl "
          f"and val.jsonl to {held_out}")


if __name__ == "__main__":
    main()
