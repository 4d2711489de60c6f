"""WordNet 3.0 for NLTK's METEOR without the NLTK downloader: no registry ships it in NLTK's layout, but Debian does.

`python -m eval.wordnet [DIR]` fetches `wordnet-base` + `wordnet-sense-index` with `apt-get download`, unpacks them
with `dpkg-deb -x` into DIR/corpora/wordnet (default: the first $NLTK_DATA entry, else `<sys.prefix>/nltk_data`,
which NLTK searches by default) and writes the `lexnames` file NLTK reads (Debian ships it only as a man page).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("wordnet-base", "wordnet-sense-index")
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}  # the syntactic category codes of lexnames(5WN)


def default_root() -> Path:
    """Where NLTK looks first: $NLTK_DATA's first entry, else the venv's own `nltk_data`."""
    env = os.environ.get("NLTK_DATA", "").split(os.pathsep)[0]
    return Path(env) if env else Path(sys.prefix) / "nltk_data"


def installed(root: Path | None = None) -> bool:
    wn = (root or default_root()) / "corpora" / "wordnet"
    return all((wn / f).is_file() for f in ("lexnames", "data.noun", "index.sense"))


def lexnames(man_page: Path) -> str:
    """The 45 `NN<TAB>name<TAB>category` lines, read from the table in the lexnames(5WN) man page."""
    rows = re.findall(r"^(\d\d)\t([a-z]+\.[A-Za-z]+)", gzip.decompress(man_page.read_bytes()).decode(), re.M)
    assert len(rows) == 45, f"expected 45 lexicographer files in {man_page}, found {len(rows)}"
    return "".join(f"{num}\t{name}\t{CATEGORY[name.split('.')[0]]}\n" for num, name in rows)


def _download(dest: Path) -> None:
    cmd = ["apt-get", "download", *PACKAGES]
    if subprocess.run(cmd, cwd=dest, capture_output=True).returncode == 0:
        return
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True)  # a fresh machine has empty apt lists
    done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (run `apt-get update` as root first?): {done.stderr.strip()}")


def install(root: Path | None = None) -> Path:
    """Install WordNet under root/corpora/wordnet; a no-op when it is already there. Returns that folder."""
    root = root or default_root()
    wn = root / "corpora" / "wordnet"
    if installed(root):
        return wn
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: WordNet comes from Debian packages {' + '.join(PACKAGES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # lets apt's unprivileged `_apt` user write there (no sandbox warning)
        _download(tmp)
        for deb in tmp.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        wn.mkdir(parents=True, exist_ok=True)
        for f in (tmp / "x/usr/share/wordnet").iterdir():
            shutil.copy2(f, wn / f.name)
        (wn / "lexnames").write_text(lexnames(tmp / "x/usr/share/man/man5/lexnames.5WN.gz"))
    return wn


if __name__ == "__main__":
    print(f"WordNet in {install(Path(sys.argv[1]) if len(sys.argv) > 1 else None)}")
