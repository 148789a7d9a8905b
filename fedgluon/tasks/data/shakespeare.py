"""Shakespeare for character-level language modelling, with a natural partition by speaking role
(as LEAF's Shakespeare: one client per (play, role)).

The vendored plays (``fedgluon/tasks/data/shakespeare/``, CC BY 2.5, see ATTRIBUTION.md) are parsed into
speeches: a paragraph whose first line is a speaker name (``NAME.``, ``Name.`` or ``NAME``) and
whose other lines are the speech, from the first ``ACT`` heading on. Train/test split *without leaking
text*: within each play the last ``test_fraction`` of speeches (a contiguous block) is test text, so no
training window overlaps test text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).with_name("shakespeare")
PLAYS = ("tempest_gut", "midsummer_nights_dream_gut", "romeo_and_juliet_gut")
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.?$")
_NOT_SPEAKERS = ("ACT", "SCENE", "Scene", "Enter", "Exit", "Exeunt", "EPILOGUE", "PROLOGUE", "THE END", "Epilogue",
                 "Prologue")


@dataclass(frozen=True)
class Speech:
    play: str
    role: str
    text: str


def parse_play(text: str, play: str) -> list[Speech]:
    """Speeches of one play in order (see module doc)."""
    start = re.search(r"^ACT\b", text, flags=re.M)
    body = text[start.start():] if start else text
    speeches = []
    for para in re.split(r"\n\s*\n", body):
        lines = [ln.rstrip() for ln in para.strip("\n").splitlines() if ln.strip()]
        if len(lines) < 2:
            continue
        head = lines[0].strip()
        if not _SPEAKER.match(head) or head.startswith(_NOT_SPEAKERS):
            continue
        speech = "\n".join(ln.strip() for ln in lines[1:] if not ln.strip().startswith("["))
        if speech:
            speeches.append(Speech(play, head.rstrip(".").upper(), speech + "\n"))
    return speeches


def load_speeches(plays: tuple[str, ...] = PLAYS, data_dir: str | Path = DATA_DIR) -> list[Speech]:
    out = []
    for play in plays:
        path = Path(data_dir) / f"{play}.txt"
        if not path.exists():
            raise FileNotFoundError(f"Shakespeare play {path} not found; available: "
                                    f"{sorted(p.stem for p in Path(data_dir).glob('*.txt'))}")
        out.extend(parse_play(path.read_text(encoding="utf-8", errors="replace"), play))
    return out


@dataclass
class CharCorpus:
    """Per-role training text, the test text, and the character vocabulary."""

    vocab: list[str]
    train: dict[tuple[str, str], str]
    test: str

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.vocab)}
        return np.array([index.get(c, 0) for c in text], dtype=np.int64)


def build_corpus(plays: tuple[str, ...] = PLAYS, test_fraction: float = 0.1, data_dir: str | Path = DATA_DIR
                 ) -> CharCorpus:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    speeches = load_speeches(plays, data_dir)
    train: dict[tuple[str, str], str] = {}
    test_parts = []
    for play in plays:
        ps = [s for s in speeches if s.play == play]
        cut = int(round(len(ps) * (1 - test_fraction)))
        for s in ps[:cut]:
            train[(s.play, s.role)] = train.get((s.play, s.role), "") + s.text
        test_parts.extend(s.text for s in ps[cut:])
    vocab = sorted(set("".join(train.values())) | set("".join(test_parts)))
    return CharCorpus(vocab, train, "".join(test_parts))


def windows(tokens: np.ndarray, context: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Input/target pairs ``(x[t:t+T], x[t+1:t+T+1])`` every ``stride`` characters (default T)."""
    stride = stride or context
    starts = np.arange(0, max(0, len(tokens) - context - 1) + 1, stride)
    if len(tokens) < context + 1:
        return np.zeros((0, context), np.int64), np.zeros((0, context), np.int64)
    idx = starts[:, None] + np.arange(context)[None, :]
    return tokens[idx], tokens[idx + 1]
