"""Hash-pinned downloads with a cache, retries with backoff, and atomic placement."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from headstart.errors import UserError
from headstart.files import file_digest

log = logging.getLogger("headstart.download")

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class DownloadError(UserError):
    """A download failed for good (after retries) or gave the wrong bytes."""


def hash_kind(expected: str) -> str:
    """md5 for 32 hex digits (Keras's published hashes), sha256 for 64."""
    kinds = {32: "md5", 64: "sha256"}
    if len(expected) not in kinds:
        raise ValueError(f"a pinned hash must be 32 (md5) or 64 (sha256) hex digits: {expected!r}")
    return kinds[len(expected)]


def check_url(url: str) -> None:
    """HTTPS only; plain HTTP only to this machine (tests, local mirrors); file:// for local."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("https", "file"):
        return
    if parsed.scheme == "http" and parsed.hostname in _LOOPBACK:
        return
    raise DownloadError(f"refusing to download {url}: only https:// URLs are allowed")


def url_allowed(url: str) -> bool:
    try:
        check_url(url)
    except DownloadError:
        return False
    return True


def fetch(
    url: str,
    file_name: str,
    expected_hash: str,
    cache_dir: Path | str,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Return the path of `file_name` in `cache_dir`, downloading it from `url` if needed.

    The file is written to a temporary name in the cache folder, checked against
    `expected_hash`, then renamed: a failed or corrupt download leaves nothing behind.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / file_name
    kind = hash_kind(expected_hash)
    if target.exists():
        if file_digest(target, kind) == expected_hash:
            log.info("weights: using cached %s", target)
            return target
        log.warning(
            "weights: cached %s has the wrong %s; removed it, downloading again", target, kind
        )
        target.unlink()
    check_url(url)
    cache_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(1, retries + 1):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".part", dir=cache_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                actual = _stream(url, handle, kind, timeout)
            if actual != expected_hash:
                raise DownloadError(
                    f"{url}: {kind} mismatch, expected {expected_hash} but got {actual}; "
                    "the file is corrupt or not the pinned one (nothing was kept)"
                )
            os.replace(tmp, target)
            return target
        except urllib.error.HTTPError as err:
            tmp.unlink(missing_ok=True)
            if err.code < 500:
                raise DownloadError(
                    f"{url}: HTTP {err.code} {err.reason}; {_HOW_TO(target)}"
                ) from None
            last_error = f"HTTP {err.code} {err.reason}"
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            tmp.unlink(missing_ok=True)
            last_error = str(getattr(err, "reason", None) or err) or type(err).__name__
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if attempt < retries:
            delay = backoff * 2 ** (attempt - 1)
            log.warning(
                "weights: download failed (%s); retry %d/%d in %.0fs",
                last_error,
                attempt,
                retries - 1,
                delay,
            )
            time.sleep(delay)
    raise DownloadError(
        f"{url}: download failed after {retries} tries ({last_error}); {_HOW_TO(target)}"
    )


def _HOW_TO(target: Path) -> str:  # capitals: it reads as a sentence
    return f"offline? copy the file to {target}, or set weights.url to a mirror you can reach"


def _stream(url: str, handle, kind: str, timeout: float) -> str:
    digest = hashlib.new(kind)
    request = urllib.request.Request(url, headers={"User-Agent": "headstart"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done, next_report, started = 0, 0.1, time.monotonic()
        while block := response.read(1 << 16):
            handle.write(block)
            digest.update(block)
            done += len(block)
            if total and done / total >= next_report and time.monotonic() - started > 2:
                log.info("weights: %3.0f%% of %.1f MB", 100 * done / total, total / 1e6)
                next_report += 0.1
        if total and done != total:
            raise http.client.IncompleteRead(b"", total - done)
    return digest.hexdigest()
