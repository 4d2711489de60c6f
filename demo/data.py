"""A synthetic music instruction dataset for `dr demo`: media whose content is known, text generated from it.

Every clip is made from a few attributes (instrument, tempo, loudness; colour and pattern for images and videos) and
every answer is a short template over them, so a tiny model learns the tasks in minutes and a reader can check its
answers. The tiny ImageBind is random and its one attention block mostly averages patches, so each attribute changes
the texture or level of the whole input: instruments sit octaves apart with different harmonics, a fast tempo puts
eight times as many percussive clicks in, loudness differs by 20 dB, colours are primaries and patterns are a solid
square, stripes or dots. (Major versus minor was tried and dropped: a one-semitone shift does not survive the random
encoder; a linear probe on its features stays near chance.)

Rows follow the original's format and its datasets: music4way-like m2t / i2t / v2t captions for stage 1; musiccaps-like
captions, musicqa-like questions, mi2t and mv2t for stage 2. The held-out split has its own clips, images and videos.
Everything is deterministic from the seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from itertools import product
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from model.text.prompt import TAGS

SAMPLE_RATE = 16000
CLIP_SECONDS = 6.0
# lowest fundamental (Hz), harmonic amplitudes, decay (1/s): a buzzy low bass, a decaying mid piano, a pure high flute
INSTRUMENTS = {
    "bass": (55.0, [1 / k for k in range(1, 13)], 0.0),
    "piano": (220.0, [1.0, 0.5, 0.3, 0.15], 6.0),
    "flute": (880.0, [1.0, 0.08], 0.0),
}
TEMPOS = {"slow": 1.0, "fast": 8.0}  # notes per second
CLICK = 1.0  # level of the percussive click on each note
ARPEGGIO = (0, 4, 7, 12)  # the tonic triad and octave, in semitones
LOUDNESS = {"soft": 0.07, "loud": 0.7}  # peak amplitude
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230)}
SHAPES = {"square": "a {color} square", "stripes": "{color} stripes", "dots": "{color} dots"}
IMAGE_SIZE, VIDEO_SECONDS, VIDEO_FPS = 96, 2, 4

# attribute -> its values, for checking answers (`attribute_accuracy`)
VOCABULARY = {
    "instrument": tuple(INSTRUMENTS),
    "tempo": tuple(TEMPOS),
    "loudness": tuple(LOUDNESS),
    "color": tuple(COLORS),
    "shape": tuple(SHAPES),
}
# media per attribute combination: (train, test), and the smaller `quick` sizes
SIZES = {"audio": (10, 2), "image": (4, 1), "video": (3, 1)}
QUICK_SIZES = {"audio": (6, 1), "image": (3, 1), "video": (2, 1)}
# held-out clips per attribute combination for the multiple-choice set, beside the test split's: scoring is cheap and
# a few more questions keep its accuracy from swinging with a handful of clips
CHOICE_CLIPS = 3


@dataclass(frozen=True)
class Music:
    instrument: str
    tempo: str
    loudness: str

    def caption(self) -> str:
        return f"A {self.loudness} {self.instrument} piece at a {self.tempo} tempo."

    def long_caption(self) -> str:
        """musiccaps-like: a little longer, other wording."""
        return (
            f"The music is played on a {self.instrument}. The tempo is {self.tempo} and the sound is {self.loudness}."
        )


@dataclass(frozen=True)
class Picture:
    color: str
    shape: str

    def phrase(self) -> str:
        return SHAPES[self.shape].format(color=self.color)


# musicqa-like questions: (instruction, answer template over the clip's attributes)
QUESTIONS = (
    ("What instrument is playing?", "The instrument is a {instrument}."),
    ("What is the tempo of the music?", "The tempo is {tempo}."),
    ("How loud is the music?", "The music is {loudness}."),
)
QUESTION_ATTRIBUTE = ("instrument", "tempo", "loudness")  # the attribute each of QUESTIONS asks about
CAPTION_PROMPTS = ("Describe the music in detail.", "Write a caption for this music.")


# ------------------------------------------------------------------------------------------------------------- media
def synth_music(music: Music, rng: np.random.Generator, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """A mono arpeggio of the tonic triad, [samples] float32: timbre and octave from the instrument, note rate (and
    a percussive click on every note) from the tempo, peak level from the loudness; the note order is random."""
    root, harmonics, decay = INSTRUMENTS[music.instrument]
    note_len = 1.0 / TEMPOS[music.tempo]
    n = int(round(note_len * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    envelope = np.minimum(1.0, t / 0.01) * np.minimum(1.0, (note_len - t) / 0.03) * np.exp(-decay * t)
    click = np.zeros(n)
    click[: int(0.03 * SAMPLE_RATE)] = np.exp(-np.arange(int(0.03 * SAMPLE_RATE)) / (0.006 * SAMPLE_RATE))
    notes = []
    for _ in range(int(np.ceil(seconds / note_len))):
        freq = root * 2 ** (rng.choice(ARPEGGIO) / 12)
        wave = sum(a * np.sin(2 * np.pi * freq * (k + 1) * t) for k, a in enumerate(harmonics))
        notes.append(envelope * wave / sum(harmonics) + CLICK * click * rng.standard_normal(n))
    audio = np.concatenate(notes)[: int(seconds * SAMPLE_RATE)]
    return (LOUDNESS[music.loudness] * audio / np.abs(audio).max()).astype(np.float32)


def draw_picture(picture: Picture, rng: np.random.Generator, offset: float = 0.0) -> np.ndarray:
    """[H, W, 3] uint8: a pattern of the colour on a light grey background (a solid square, stripes or dots: very
    different textures, which a random encoder keeps apart), plus mild noise. Its placement jitters; `offset` (a
    fraction of the width) moves it sideways."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    color = COLORS[picture.color]
    x0 = IMAGE_SIZE * offset + rng.uniform(-3, 3)
    y0 = rng.uniform(-3, 3)
    if picture.shape == "square":
        half = IMAGE_SIZE * rng.uniform(0.3, 0.38)
        c = IMAGE_SIZE / 2
        draw.rectangle((c + x0 - half, c + y0 - half, c + x0 + half, c + y0 + half), fill=color)
    elif picture.shape == "stripes":
        for y in range(-12, IMAGE_SIZE + 12, 16):
            draw.rectangle((x0 + 8, y + y0, x0 + IMAGE_SIZE - 8, y + y0 + 7), fill=color)
    else:
        for x, y in product(range(4, IMAGE_SIZE, 16), repeat=2):
            draw.ellipse((x + x0, y + y0, x + x0 + 8, y + y0 + 8), fill=color)
    noise = rng.integers(-12, 13, (IMAGE_SIZE, IMAGE_SIZE, 3))  # no two images alike, even at the same placement
    return (np.asarray(img) + noise).clip(0, 255).astype(np.uint8)


def write_wav(path: Path, audio: np.ndarray) -> None:
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: int = VIDEO_FPS) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def moving_picture(picture: Picture, rng: np.random.Generator) -> list[np.ndarray]:
    """The shape sliding from left to right over VIDEO_SECONDS."""
    count, seed = VIDEO_SECONDS * VIDEO_FPS, int(rng.integers(1 << 32))
    return [draw_picture(picture, np.random.default_rng(seed), -0.15 + 0.3 * i / (count - 1)) for i in range(count)]


# -------------------------------------------------------------------------------------------------------------- rows
def row(row_id: str, media: Sequence[tuple[str, str]], instruction: str, output: str) -> dict:
    """One row in the original's format; each (modality, path) becomes a placeholder in `input`."""
    return {
        "id": row_id,
        "input": "".join(TAGS[m] for m, _ in media),
        "instruction": instruction,
        "output": output,
        "mm_names": [m for m, _ in media],
        "mm_paths": [p for _, p in media],
    }


def task_rows(
    clips: list[tuple[str, Music]],
    images: list[tuple[str, Picture]],
    videos: list[tuple[str, Picture]],
    rng: np.random.Generator,
) -> dict[str, list[dict]]:
    """Every task's rows over one split's media. Pairings of music with images / videos are random."""
    pick = [images[i] for i in rng.integers(len(images), size=len(clips))]
    show = [videos[i] for i in rng.integers(len(videos), size=len(clips))]
    return {
        "m2t": [row(f"m2t-{Path(p).stem}", [("audio", p)], "Describe the music.", m.caption()) for p, m in clips],
        "i2t": [
            row(f"i2t-{Path(p).stem}", [("image", p)], "Describe the image.", f"The image shows {pic.phrase()}.")
            for p, pic in images
        ],
        "v2t": [
            row(f"v2t-{Path(p).stem}", [("video", p)], "Describe the video.", f"The video shows {pic.phrase()} moving.")
            for p, pic in videos
        ],
        "musiccaps": [
            row(f"musiccaps-{Path(p).stem}", [("audio", p)], CAPTION_PROMPTS[i % 2], m.long_caption())
            for i, (p, m) in enumerate(clips)
        ],
        "musicqa": [
            row(f"musicqa-{Path(p).stem}", [("audio", p)], q, a.format(**asdict(m)))
            for p, m in clips
            for q, a in QUESTIONS
        ],
        "mi2t": [
            row(
                f"mi2t-{Path(p).stem}",
                [("audio", p), ("image", ip)],
                "Describe the music and the image.",
                f"{m.caption()[:-1]}, with an image of {pic.phrase()}.",
            )
            for (p, m), (ip, pic) in zip(clips, pick, strict=True)
        ],
        "mv2t": [
            row(
                f"mv2t-{Path(p).stem}",
                [("audio", p), ("video", vp)],
                "Describe the music and the video.",
                f"{m.caption()[:-1]}, with a video of {pic.phrase()} moving.",
            )
            for (p, m), (vp, pic) in zip(clips, show, strict=True)
        ],
    }


def choice_rows(clips: list[tuple[str, Music]], rng: np.random.Generator) -> list[dict]:
    """MuChoMusic-style multiple choice over the musicqa questions: the options are the question's answer sentence
    for every value of its attribute (3 instruments, 2 tempos, 2 loudnesses), in a random order per row, listed in
    MuChoMusic's prompt; the answer is the sentence for the clip's own value (model/data/multiple_choice.py's
    row format)."""
    from model.data.benchmarks import mc_row, muchomusic_prompt

    rows = []
    for path, music in clips:
        for (question, template), attribute in zip(QUESTIONS, QUESTION_ATTRIBUTE, strict=True):
            values = list(VOCABULARY[attribute])
            options = [template.format(**{attribute: values[k]}) for k in rng.permutation(len(values))]
            answer = options.index(template.format(**{attribute: getattr(music, attribute)}))
            row_id = f"musicmc-{Path(path).stem}-{attribute}"
            rows.append(mc_row(row_id, path, question, options, answer, [f"attribute: {attribute}"], muchomusic_prompt))
    return rows


STAGE1_TASKS = ("m2t", "i2t", "v2t")
STAGE2_TASKS = ("musiccaps", "musicqa", "mi2t", "mv2t")
CHOICE_TASK = "musicmc"  # trained in stage 2, held out on its own (demo_choice_test.json): scored by accuracy


@dataclass(frozen=True)
class DemoData:
    """Where build() wrote the dataset: training JSON files per stage, the held-out JSON (all stage-2 tasks but the
    multiple-choice one) and the held-out multiple-choice JSON."""

    root: Path
    stage1: list[Path]
    stage2: list[Path]
    test: Path
    choice_test: Path

    def texts(self) -> list[str]:
        """Every instruction and answer: the corpus the demo's tokenizer is trained on."""
        out: list[str] = []
        for path in [*self.stage1, *self.stage2, self.test, self.choice_test]:
            out += [text for r in json.loads(path.read_text()) for text in (r["instruction"], r["output"])]
        return list(dict.fromkeys(out))


def _media(root: Path, split: str, sizes: dict[str, tuple[int, int]], seed: int):
    """Writes one split's audio, images and videos; returns [(relative path, attributes)] per modality."""
    index = {"train": 0, "test": 1}[split]
    clips, images, videos = [], [], []
    for folder in ("audios", "images", "videos"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, index, 0])
    for i, music in enumerate(
        m for m in (Music(*a) for a in product(INSTRUMENTS, TEMPOS, LOUDNESS)) for _ in range(sizes["audio"][index])
    ):
        path = f"audios/{split}_{i:04d}.wav"
        write_wav(root / path, synth_music(music, rng))
        clips.append((path, music))
    rng = np.random.default_rng([seed, index, 1])
    pictures = [Picture(*a) for a in product(COLORS, SHAPES)]
    for i, pic in enumerate(p for p in pictures for _ in range(sizes["image"][index])):
        path = f"images/{split}_{i:04d}.png"
        Image.fromarray(draw_picture(pic, rng)).save(root / path)
        images.append((path, pic))
    for i, pic in enumerate(p for p in pictures for _ in range(sizes["video"][index])):
        path = f"videos/{split}_{i:04d}.mp4"
        write_mp4(root / path, moving_picture(pic, rng))
        videos.append((path, pic))
    return clips, images, videos


def _choice_clips(root: Path, seed: int) -> list[tuple[str, Music]]:
    """Audio-only held-out clips of the multiple-choice set (its own seed stream: the other splits are unchanged)."""
    rng = np.random.default_rng([seed, 4, 0])
    combos = [Music(*a) for a in product(INSTRUMENTS, TEMPOS, LOUDNESS)]
    clips = []
    for i, music in enumerate(m for m in combos for _ in range(CHOICE_CLIPS)):
        path = f"audios/choice_{i:04d}.wav"
        write_wav(root / path, synth_music(music, rng))
        clips.append((path, music))
    return clips


def build(root: str | Path, seed: int = 0, quick: bool = False) -> DemoData:
    """Writes media and row files under `root` (media paths are relative to it, the files' own folder)."""
    root = Path(root)
    sizes = QUICK_SIZES if quick else SIZES
    files: dict[str, Path] = {}
    test_rows: list[dict] = []
    for split in ("train", "test"):
        clips, images, videos = _media(root, split, sizes, seed)
        tasks = task_rows(clips, images, videos, np.random.default_rng([seed, 2, split == "test"]))
        if split == "test":
            test_rows = [r for task in STAGE2_TASKS for r in tasks[task]]
            held_out = choice_rows(clips + _choice_clips(root, seed), np.random.default_rng([seed, 3, 1]))
            choice_test = root / "demo_choice_test.json"
            choice_test.write_text(json.dumps(held_out, indent=1))
            continue
        tasks[CHOICE_TASK] = choice_rows(clips, np.random.default_rng([seed, 3, 0]))
        for task, rows in tasks.items():
            files[task] = root / f"demo_{task}_train.json"
            files[task].write_text(json.dumps(rows, indent=1))
    test = root / "demo_test.json"
    test.write_text(json.dumps(test_rows, indent=1))
    stage2 = [files[t] for t in (*STAGE2_TASKS, CHOICE_TASK)]
    return DemoData(root, [files[t] for t in STAGE1_TASKS], stage2, test, choice_test)


# ----------------------------------------------------------------------------------------------------------- scoring
def mentioned(text: str, attribute: str) -> set[str]:
    """The values of an attribute that a text names (whole words)."""
    return {v for v in VOCABULARY[attribute] if re.search(rf"\b{v}\b", text.lower())}


def attribute_accuracy(cands: Sequence[str], refs: Sequence[str]) -> dict[str, float | None]:
    """Per attribute, the share of reference mentions that the answer gets right (names the value and no other
    value of the attribute); "all" pools every mention. None where no reference mentions the attribute."""
    right = dict.fromkeys([*VOCABULARY, "all"], 0)
    total = dict.fromkeys([*VOCABULARY, "all"], 0)
    for cand, ref in zip(cands, refs, strict=True):
        for attribute in VOCABULARY:
            wanted = mentioned(ref, attribute)
            if len(wanted) == 1:
                ok = mentioned(cand, attribute) == wanted
                for key in (attribute, "all"):
                    total[key] += 1
                    right[key] += ok
    return {k: right[k] / total[k] if total[k] else None for k in total}
