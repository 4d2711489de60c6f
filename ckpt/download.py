"""`dr ckpt download`: the DeepResonance deltas from the Hugging Face hub and ImageBind-huge from its URL.

Every file is fetched under a temporary name (huggingface_hub's staging folder, or `imagebind_huge.pth.part`),
verified (size, sha256 when known, and that it loads as weights), and only then moved to its final path, so a path
in the layout either holds a complete file or nothing. Interrupted transfers resume with HTTP Range requests.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress, TaskID

from ckpt.expected import PROJ_WEIGHT, imagebind_problems
from ckpt.files import byte_progress, hub_tqdm
from ckpt.layout import (
    HF_DATA_REPO,
    IMAGEBIND_URL,
    IMAGEBIND_URL_ENV,
    PARTIAL_SUFFIX,
    PIECES,
    CkptLayout,
    Piece,
    layout,
)
from model.config import Variant
from model.io.errors import CkptError
from model.io.files import hub_offline
from model.io.http import TRANSFER_ERRORS, backoff, failure, retrying, timeouts
from model.io.manifest import CHUNK, read_manifest, record_manifest, sha256_file
from model.io.weights import tensor_shapes

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoFile


def download(
    what: Piece = "all",
    root: str | Path = "ckpt",
    *,
    imagebind_url: str | None = None,
    imagebind_sha256: str | None = None,
    endpoint: str | None = None,
    retries: int = 3,
    force: bool = False,
    console: Console | None = None,
) -> list[Path]:
    """Fetch the requested pieces into the layout under `root`; returns their final paths.

    Each piece is tried even when an earlier one failed; then one CkptError carries one line per failed piece.
    Pieces already in place (as recorded in the manifest) are skipped unless `force`.
    """
    paths = layout(root)
    done: list[Path] = []
    errors: list[str] = []
    with byte_progress(console) as progress:
        for piece in PIECES if what == "all" else (what,):
            try:
                if piece == "imagebind":
                    done.append(fetch_imagebind(paths, imagebind_url, progress, imagebind_sha256, retries, force))
                else:
                    done.append(fetch_delta(paths, piece, progress, endpoint, force, retries))
            except CkptError as e:
                errors.append(str(e))
    if errors:
        raise CkptError("\n".join(errors))
    return done


def fetch_delta(
    paths: CkptLayout,
    variant: Variant,
    progress: Progress,
    endpoint: str | None = None,
    force: bool = False,
    retries: int = 3,
) -> Path:
    """The variant's delta folder from the hub dataset repo: the files not yet in place, in one snapshot_download
    (which resumes with Range), each verified against the hub's listing before it is moved into place. A failed
    attempt (timeout, connection reset, 5xx) is retried with backoff, then one line says how to place it."""
    final = paths.delta_dir(variant)
    by_hand = f"download the files of {paths.delta_web_url(variant)} by hand into {final}"
    if hub_offline():
        raise CkptError(f"could not fetch the DeepResonance {variant} delta: offline (HF_HUB_OFFLINE=1); {by_hand}")
    try:
        return retrying(lambda: _fetch_delta_once(paths, variant, progress, endpoint, force, by_hand), retries)
    except CkptError:
        raise
    except Exception as e:  # connection refused, DNS, timeouts, HTTP errors: all mean "fetch it by hand"
        raise CkptError(f"could not fetch the DeepResonance {variant} delta ({failure(e)}); {by_hand}") from e


def _fetch_delta_once(
    paths: CkptLayout, variant: Variant, progress: Progress, endpoint: str | None, force: bool, by_hand: str
) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    final = paths.delta_dir(variant)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT")
    folder = paths.delta_repo_path(variant)
    api = HfApi(endpoint=endpoint)
    commit = api.dataset_info(HF_DATA_REPO, revision="main", timeout=timeouts()[1]).sha  # one commit for all
    entries = [
        e
        for e in api.list_repo_tree(HF_DATA_REPO, folder, recursive=True, revision=commit, repo_type="dataset")
        if isinstance(e, RepoFile)
    ]
    if not entries:
        raise CkptError(f"{HF_DATA_REPO} has no files under {folder}; {by_hand}")
    wanted = [e for e in entries if force or not _already_there(final, e.path[len(folder) + 1 :], e.size, _lfs(e))]
    if wanted:  # exact paths as patterns: files already in place are not fetched again
        snapshot_download(
            HF_DATA_REPO,
            repo_type="dataset",
            revision=commit,
            allow_patterns=[e.path for e in wanted],
            local_dir=paths.staging,
            endpoint=endpoint,
            tqdm_class=hub_tqdm(progress),
            etag_timeout=timeouts()[1],
        )
    staged: dict[str, tuple[Path, str]] = {}
    for entry in wanted:
        path = paths.staging / entry.path
        if not path.is_file():  # snapshot_download hands back the folder as is when the hub went away meanwhile
            raise ConnectionError(f"{entry.path} was not fetched")
        staged[entry.path[len(folder) + 1 :]] = (path, _verify_hub_file(path, entry.size, _lfs(entry), progress))
    for name, (path, sha256) in staged.items():
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        path.replace(final / name)
        record_manifest(final, {name: {"size": (final / name).stat().st_size, "sha256": sha256}})
    shutil.rmtree(paths.staging / folder, ignore_errors=True)
    return final


def _lfs(entry: RepoFile) -> str | None:
    """The sha256 the hub lists for a file (LFS files only; small git files have none)."""
    return entry.lfs.sha256 if entry.lfs else None


def _already_there(final: Path, name: str, size: int, sha256: str | None) -> bool:
    """A file already in place with the hub's size and the hub's sha256 as recorded when it was fetched."""
    path = final / name
    if not path.is_file() or path.stat().st_size != size:
        return False
    recorded = read_manifest(final).get(name, {})
    return sha256 is None or recorded.get("sha256") == sha256


def _verify_hub_file(path: Path, size: int, sha256: str | None, progress: Progress) -> str:
    """Size and sha256 against the hub's listing; weights files must load. A bad file is deleted, to be refetched."""
    from model.network.checkpoint import (  # here: model.network.checkpoint imports transformers (~4 s)
        DELTA_PT,
        DELTA_ST,
    )

    actual = sha256_file(path, progress)
    problem = None
    if path.stat().st_size != size:
        problem = f"{path.stat().st_size} bytes, the hub lists {size}"
    elif sha256 is not None and actual != sha256:
        problem = f"sha256 {actual[:12]}…, the hub lists {sha256[:12]}…"
    elif path.name in (DELTA_PT, DELTA_ST):
        try:
            if PROJ_WEIGHT not in tensor_shapes(path):
                problem = f"no {PROJ_WEIGHT}: not a DeepResonance delta"
        except CkptError as e:
            problem = str(e)
    if problem:
        path.unlink()
        raise CkptError(f"corrupt download {path.name} ({problem}); it was deleted, run the command again")
    return actual


def imagebind_source(url: str | None = None) -> str:
    return url or os.environ.get(IMAGEBIND_URL_ENV) or IMAGEBIND_URL


def fetch_imagebind(
    paths: CkptLayout,
    url: str | None,
    progress: Progress,
    sha256: str | None = None,
    retries: int = 3,
    force: bool = False,
) -> Path:
    """imagebind_huge.pth over plain HTTP(S) into `<name>.part`, resumed with Range after a cut, then verified."""
    url = imagebind_source(url)
    final = paths.imagebind
    by_hand = f"download {url} by hand to {final}"
    if not force and final.is_file():
        recorded = read_manifest(final.parent).get(final.name)
        if recorded is None:  # placed by hand: adopt it if it is a complete ImageBind file
            sha = _verify_imagebind(final, None, sha256, progress, delete=False)
            record_manifest(final.parent, {final.name: {"size": final.stat().st_size, "sha256": sha}})
            return final
        if recorded["size"] == final.stat().st_size:
            return final
    if hub_offline():  # offline means no downloads at all, the plain URL included
        raise CkptError(f"could not fetch ImageBind-huge: offline (HF_HUB_OFFLINE=1); {by_hand}")
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + PARTIAL_SUFFIX)
    task = progress.add_task(final.name, total=None)
    for attempt in range(retries + 1):
        try:
            total = _transfer(url, part, progress, task)
            break
        except TRANSFER_ERRORS as e:
            if attempt < retries:
                backoff(attempt)
                continue
            kept = part.stat().st_size if part.exists() else 0
            resume = f"{kept} bytes kept in {part} (run again to resume), or " if kept else ""
            raise CkptError(f"could not fetch ImageBind-huge ({type(e).__name__}: {e}); {resume}{by_hand}") from e
    actual = _verify_imagebind(part, total, sha256, progress)
    part.replace(final)
    record_manifest(final.parent, {final.name: {"size": final.stat().st_size, "sha256": actual}})
    return final


def _transfer(url: str, part: Path, progress: Progress, task: TaskID) -> int | None:
    """One GET, resuming after the bytes already in `part`; returns the full size when the server tells it."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeouts()[1])  # per connect and per read
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is complete, or longer than the file
            total = _total_from_range(e.headers.get("Content-Range"))
            if total == have:
                return total
            part.unlink()
        raise
    with response:
        if response.status == 206:
            total = _total_from_range(response.headers.get("Content-Range"))
        else:  # 200: the server ignored Range (or there was nothing to resume): start over
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        progress.update(task, total=total, completed=have)
        with open(part, "ab" if have else "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                progress.advance(task, len(chunk))
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")
    return total


def _total_from_range(content_range: str | None) -> int | None:
    """`bytes 100-199/200` or `bytes */200` -> 200."""
    if not content_range or content_range.endswith("/*"):
        return None
    return int(content_range.rsplit("/", 1)[1])


def _verify_imagebind(
    part: Path, total: int | None, sha256: str | None, progress: Progress, delete: bool = True
) -> str:
    """Size, sha256 when known, and that it loads as an ImageBind state dict; a bad transfer is deleted."""
    size = part.stat().st_size
    actual = sha256_file(part, progress)
    if total is not None and size != total:
        problem = f"{size} bytes, the server announced {total}"
    elif sha256 is not None and actual != sha256:
        problem = f"sha256 {actual[:12]}…, expected {sha256[:12]}…"
    else:
        try:
            problem = "; ".join(imagebind_problems(tensor_shapes(part))) or None
        except CkptError as e:
            problem = str(e)
    if problem and not delete:
        raise CkptError(f"{part} is corrupt ({problem}); run `dr ckpt download imagebind --force`")
    if problem:
        part.unlink()
        raise CkptError(f"corrupt download of ImageBind-huge ({problem}); it was deleted, run the command again")
    return actual
