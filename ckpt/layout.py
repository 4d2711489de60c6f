"""Where every checkpoint piece lives: the original's `ckpt/` folder layout, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from model.config import HF_DATA_REPO, HF_WEB, Variant

IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
IMAGEBIND_URL_ENV = "DR_IMAGEBIND_URL"  # overrides IMAGEBIND_URL (a mirror, or a local server in tests)
VICUNA_DELTA_REPO = "lmsys/vicuna-7b-delta-v0"

IMAGEBIND_FILE = "imagebind_huge.pth"
PARTIAL_SUFFIX = ".part"  # transfers in progress (resumed by Range); renamed to the final name once verified
Piece = Literal["alpha", "beta", "imagebind", "all"]
PIECES: tuple[Piece, ...] = ("alpha", "beta", "imagebind")  # what `dr ckpt download` fetches


@dataclass(frozen=True)
class CkptLayout:
    """Paths under a checkpoint root laid out as the original repository's `ckpt/` folder."""

    root: Path

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained_ckpt"

    @property
    def vicuna(self) -> Path:
        return self.pretrained / "vicuna_ckpt" / "7b_v0"

    @property
    def imagebind_dir(self) -> Path:
        return self.pretrained / "imagebind_ckpt" / "huge"

    @property
    def imagebind(self) -> Path:
        return self.imagebind_dir / IMAGEBIND_FILE

    def delta_dir(self, variant: Variant) -> Path:
        return self.root / f"deepresonance_{variant}_delta_ckpt" / "deepresonance" / "7b_tiva_v0"

    def delta_repo_path(self, variant: Variant) -> str:
        """The delta folder's path inside the Hugging Face dataset repo."""
        return f"ckpt/deepresonance_{variant}_delta_ckpt/deepresonance/7b_tiva_v0"

    def delta_web_url(self, variant: Variant) -> str:
        """Where a person finds the delta folder in a browser."""
        return f"{HF_WEB}/datasets/{HF_DATA_REPO}/tree/main/{self.delta_repo_path(variant)}"

    @property
    def staging(self) -> Path:
        """Hub transfers land here first (resumable), and move to their final place once verified."""
        return self.root / ".dr_download"


def layout(root: str | Path) -> CkptLayout:
    return CkptLayout(Path(root))
