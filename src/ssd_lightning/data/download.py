"""Fetch the official Penn-Fudan archive into a user-supplied root (never needed for the
vendored copy). Offline it fails within `timeout` seconds with a message saying what to do."""

from __future__ import annotations

import shutil
import socket
import stat
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from ssd_lightning.config.errors import DataError
from ssd_lightning.data.manifest import sha256_file

URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"


class DownloadError(DataError, RuntimeError):
    """The archive could not be fetched, verified or extracted."""


def _check_member(name: str, info: zipfile.ZipInfo | None = None) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or p.is_absolute():
        raise DownloadError(f"refusing to extract absolute path {name!r} from the archive")
    if ".." in p.parts:
        raise DownloadError(f"refusing to extract {name!r}: it contains '..'")
    if info is not None and stat.S_ISLNK(info.external_attr >> 16):
        raise DownloadError(f"refusing to extract symbolic link {name!r}")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a zip into `dest`, rejecting absolute paths, `..` members and symlinks
    (all members are checked before anything is written)."""
    dest = Path(dest).resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_member(info.filename, info)
            target = (dest / info.filename).resolve()
            if target != dest and dest not in target.parents:
                raise DownloadError(f"refusing to extract {info.filename!r} outside {dest}")
        dest.mkdir(parents=True, exist_ok=True)
        zf.extractall(dest)
    return dest


def _resolve_host(url: str, timeout: float) -> None:
    # urlopen's timeout does not cover DNS, which is what hangs on an offline machine; resolve in
    # a daemon thread (it must not keep the process alive) and give up after `timeout`.
    host = urllib.parse.urlparse(url).hostname or ""
    result: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(None)
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    th = threading.Thread(target=resolve, daemon=True, name="pennfudan-dns")
    th.start()
    th.join(timeout)
    if not result:
        raise OSError(f"DNS lookup of {host} timed out after {timeout}s")
    if result[0] is not None:
        raise OSError(f"DNS lookup of {host} failed: {result[0]}")


def download_pennfudan(
    root: str | Path, url: str = URL, sha256: str | None = None, timeout: float = 5.0
) -> Path:
    """Download and extract the archive so that `root/PNGImages` etc. exist; returns `root`.

    `root` is the dataset folder itself (the archive's top-level `PennFudanPed/` is stripped).
    If `sha256` is given the archive must match it.
    """
    root = Path(root)
    try:
        if urllib.parse.urlparse(url).scheme in ("http", "https"):
            _resolve_host(url, timeout)
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "PennFudanPed.zip"
            with urllib.request.urlopen(url, timeout=timeout) as r, archive.open("wb") as f:
                shutil.copyfileobj(r, f)
            if sha256 is not None and sha256_file(archive) != sha256.lower():
                raise DownloadError(
                    f"checksum mismatch for {url}: expected sha256 {sha256} "
                    "(config key data.download_sha256)"
                )
            out = safe_extract(archive, Path(tmp) / "x")
            inner = out / "PennFudanPed" if (out / "PennFudanPed").is_dir() else out
            root.mkdir(parents=True, exist_ok=True)
            for item in inner.iterdir():
                dst = root / item.name
                if not dst.exists():
                    shutil.move(str(item), dst)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{url} did not return a valid zip archive ({e})") from e
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DownloadError(
            f"could not download Penn-Fudan from {url} ({e}). This machine looks offline. "
            f"Copy the PennFudanPed folder (PNGImages, PedMasks) to {root} by hand, or point "
            "data.root at the vendored copy in data/PennFudanPed."
        ) from e
    return root
