"""The Python half of ``benchmarks/gpu_suite.sh`` and ``benchmarks/prepare_gpu_payload.sh``.

A GPU machine without a package index gets what it lacks as files: wheels, and the asset
cache (``$CPT_CACHE`` layout, :mod:`cpt.assets`) packed as a tar split into chunks small
enough to travel one per call. This module packs and reassembles the chunks, checks that
the wheel list covers what the suite imports, and writes the suite's figures into
``benchmarks/RESULTS.md`` (:func:`results.replace_section`). Standard library only (plus
``packaging`` for requirement checks), so it runs on the bare machine before any install.

    python benchmarks/gpu_suite_lib.py pack --cache ~/.cache/cpt --out .gpu_assets --chunk-mib 48 MEMBER...
    python benchmarks/gpu_suite_lib.py assemble --assets .gpu_assets --stash /tmp/s --cache /tmp/c
    python benchmarks/gpu_suite_lib.py check-wheels --repo . trl==1.16.0 ...
    python benchmarks/gpu_suite_lib.py check-env trl==1.16.0 ...      # on the GPU, after the install
    python benchmarks/gpu_suite_lib.py record --work /tmp/cpt-gpu-suite
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import importlib.metadata
import json
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TAR_NAME = "cpt-assets.tar"
MANIFEST = "cpt-assets.manifest.json"

# The target GPU image's Python distributions (the H200 "cuda" image, package list read
# 2026-11-17), normalized names; versions where the image's `pip list` was read.
GPU_IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
GPU_IMAGE = set(GPU_IMAGE_VERSIONS) | set(
    """absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
    formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
    interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
    ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
    nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
    peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu scikit-build-core scikit-image
    scikit-learn scipy seaborn sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
    sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm toolz
    torch-geometric torchaudio torchdiffeq torchmetrics torchvision tqdm treescope typer typing-extensions
    typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# What the suite runs: the package and the benchmark scripts whose imports must resolve there.
IMPORT_ROOTS = ("cpt", "callbacks")
BENCHMARK_SCRIPTS = ("merge_speed.py", "geometry_speed.py", "eval_speed.py", "zero3_vs_plain.py", "continual.py")
FIRST_PARTY = {"cpt", "callbacks", "results", "merge_speed", "tiny_recipes", "conftest"}
# Imports that happen inside a dependency at run time, not in our files: transformers reads a
# GGUF file (cpt.assets.gguf, `from_pretrained(gguf_file=...)`) through the gguf package.
INDIRECT_IMPORTS = {"gguf": "cpt/assets/gguf.py (transformers' GGUF loader)"}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(pins: list[str]) -> dict[str, str]:
    """``name==version`` items → {normalized name: version}; a malformed item or a repeated name is an error."""
    parsed: dict[str, str] = {}
    for pin in pins:
        name, sep, version = pin.partition("==")
        if not sep or not name or not version:
            raise SystemExit(f"gpu_suite: wheel pin '{pin}' is not NAME==VERSION")
        if normalize(name) in parsed:
            raise SystemExit(f"gpu_suite: wheel '{name}' is pinned twice (two versions stop the whole install)")
        parsed[normalize(name)] = version
    return parsed


# ---------------------------------------------------------------------------------------- chunks


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(cache: Path, members: list[str], out: Path, chunk_mib: float) -> list[Path]:
    """Tar ``members`` (paths inside ``cache``) and split the tar into ``out/part-NN/`` folders.

    Each part folder holds one chunk of at most ``chunk_mib`` MiB and a copy of the manifest
    (the whole tar's sha256 and every chunk's name, size and sha256), so any call that
    carries one part also carries what is needed to check it.
    """
    missing = [member for member in members if not (cache / member).exists()]
    if missing:
        raise SystemExit(f"gpu_suite: not in the asset cache {cache}: {', '.join(missing)} (run `cpt assets fetch`)")
    if chunk_mib <= 0:
        raise SystemExit("gpu_suite: --chunk-mib must be positive")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tar_path = out / TAR_NAME
    with tarfile.open(tar_path, "w") as tar:
        for member in members:
            tar.add(cache / member, arcname=member)
    chunk_bytes = int(chunk_mib * 2**20)
    chunks = []
    with open(tar_path, "rb") as source:
        index = 0
        while block := source.read(chunk_bytes):
            part = out / f"part-{index:02d}"
            part.mkdir()
            chunk = part / f"{TAR_NAME}.{index:02d}"
            chunk.write_bytes(block)
            chunks.append(chunk)
            index += 1
    manifest = {
        "tar": TAR_NAME,
        "sha256": sha256(tar_path),
        "bytes": tar_path.stat().st_size,
        "members": members,
        "chunks": [{"name": c.name, "bytes": c.stat().st_size, "sha256": sha256(c)} for c in chunks],
    }
    tar_path.unlink()
    for chunk in chunks:
        (chunk.parent / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return chunks


def stash(assets: Path, stash_dir: Path) -> dict | None:
    """Copy every chunk and manifest found under ``assets`` into ``stash_dir``; return the manifest if any."""
    stash_dir.mkdir(parents=True, exist_ok=True)
    if assets.is_dir():
        for path in sorted(assets.rglob("*")):
            if path.is_file() and (path.name == MANIFEST or path.name.startswith(f"{TAR_NAME}.")):
                target = stash_dir / path.name
                if not target.exists() or target.stat().st_size != path.stat().st_size:
                    shutil.copyfile(path, target)
    manifest = stash_dir / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def assemble(assets: Path, stash_dir: Path, cache: Path) -> list[str]:
    """Stash what ``assets`` holds, then, if every chunk is there and checks, extract the tar into ``cache``.

    Raises SystemExit naming the missing or damaged chunk. Returns the members extracted.
    """
    manifest = stash(assets, stash_dir)
    if manifest is None:
        where = f"{assets} or {stash_dir}" if assets.resolve() != stash_dir.resolve() else str(stash_dir)
        raise SystemExit(f"gpu_suite: no {MANIFEST} in {where}: carry a .gpu_assets/part-NN folder (--assets)")
    missing = [c["name"] for c in manifest["chunks"] if not (stash_dir / c["name"]).is_file()]
    if missing:
        raise SystemExit(
            f"gpu_suite: asset chunks missing from {stash_dir}: {', '.join(missing)} — carry each "
            ".gpu_assets/part-NN folder in back-to-back calls (the machine keeps the stash only while warm)"
        )
    for chunk in manifest["chunks"]:
        actual = sha256(stash_dir / chunk["name"])
        if actual != chunk["sha256"]:
            raise SystemExit(f"gpu_suite: chunk {chunk['name']} is damaged (sha256 {actual[:12]}…): carry it again")
    tar_path = stash_dir / manifest["tar"]
    with open(tar_path, "wb") as whole:
        for chunk in manifest["chunks"]:
            with open(stash_dir / chunk["name"], "rb") as part:
                shutil.copyfileobj(part, whole)
    if sha256(tar_path) != manifest["sha256"]:
        raise SystemExit(f"gpu_suite: the reassembled {manifest['tar']} does not match its manifest's sha256")
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.name.startswith(("/", "..")) or "/../" in member.name:
                raise SystemExit(f"gpu_suite: refusing tar member outside the cache: {member.name}")
        tar.extractall(cache, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(cache)
    tar_path.unlink()
    return manifest["members"]


# ---------------------------------------------------------------------------------------- wheels


def third_party_imports(repo: Path) -> dict[str, list[str]]:
    """Top-level modules imported (absolute imports) by cpt/, callbacks/ and the suite's scripts → files."""
    files = [path for root in IMPORT_ROOTS for path in sorted((repo / root).rglob("*.py"))]
    files += [repo / "benchmarks" / name for name in BENCHMARK_SCRIPTS]
    found: dict[str, list[str]] = {}
    stdlib = set(sys.stdlib_module_names)
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in FIRST_PARTY and top != "__future__":
                    found.setdefault(top, []).append(str(path.relative_to(repo)))
    for module, where in INDIRECT_IMPORTS.items():
        found.setdefault(module, []).append(where)
    return found


def optional_extras(repo: Path) -> set[str]:
    """Distributions that only cpt's optional extras (``[project.optional-dependencies]`` but ``test``)
    bring in: the suite never needs them, so they are no gap in its wheel list."""
    import tomllib
    from packaging.requirements import Requirement

    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return {normalize(Requirement(spec).name) for name, specs in extras.items() if name != "test" for spec in specs}


def wheel_requirements(pin_name: str, version: str, wheel_dir: Path | None) -> list[str] | None:
    """Requires-Dist of ``pin_name==version``: from its wheel in ``wheel_dir``, else from this environment
    if the same version is installed here; None when neither has it."""
    if wheel_dir is not None:
        for wheel in wheel_dir.glob("*.whl"):
            name, wheel_version = wheel.name.split("-")[:2]
            if normalize(name) == pin_name and wheel_version == version:
                with zipfile.ZipFile(wheel) as archive:
                    metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
                    text = archive.read(metadata).decode()
                return [
                    line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")
                ]
    try:
        distribution = importlib.metadata.distribution(pin_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return list(distribution.requires or []) if distribution.version == version else None


def check_wheels(repo: Path, pins: list[str], wheel_dir: Path | None) -> list[str]:
    """Problems with the wheel list (empty when it covers the suite): every third-party import of the
    suite is on the GPU image or pinned; every pinned wheel's requirements are too (versions checked
    where the image's version is known); with ``wheel_dir``, every pin has exactly one wheel file."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pinned = parse_pins(pins)
    problems, notes = [], []
    module_to_dists = importlib.metadata.packages_distributions()
    extras = optional_extras(repo)
    for module, files in sorted(third_party_imports(repo).items()):
        dists = [normalize(d) for d in module_to_dists.get(module, [])]
        if not dists:
            notes.append(f"import {module} ({files[0]}) is not installed here: an optional import, not checked")
            continue
        if any(d in extras for d in dists):  # e.g. lm-eval: an extra of cpt's, whether installed here or not
            notes.append(f"import {module} ({files[0]}): {dists[0]} is an optional extra of cpt, not checked")
            continue
        if not any(d in GPU_IMAGE or d in pinned for d in dists):
            problems.append(
                f"import {module} ({files[0]}): distribution {dists[0]} is neither on the GPU image nor pinned"
            )
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}  # fmt: skip
    for name, version in sorted(pinned.items()):
        requirements = wheel_requirements(name, version, wheel_dir)
        if requirements is None:
            notes.append(
                f"{name}=={version}: neither its wheel nor this version is here; its requirements are unchecked"
            )
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            dependency = normalize(requirement.name)
            if dependency in pinned:
                have = pinned[dependency]
            elif dependency in GPU_IMAGE:
                have = GPU_IMAGE_VERSIONS.get(dependency)
            else:
                problems.append(
                    f"{name}=={version} requires {text}: {dependency} is neither on the GPU image nor pinned"
                )
                continue
            if have is not None and requirement.specifier and Version(have) not in requirement.specifier:
                problems.append(f"{name}=={version} requires {text}, but the GPU would have {dependency} {have}")
    if wheel_dir is not None:
        for name, version in sorted(pinned.items()):
            files = [w for w in wheel_dir.glob("*.whl") if normalize(w.name.split("-")[0]) == name]
            if [w.name.split("-")[1] for w in files] != [version]:
                problems.append(f"{wheel_dir}: want one wheel of {name}=={version}, found {[w.name for w in files]}")
    for note in notes:
        print(f"note: {note}")
    return problems


KEY_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "pydantic", "gguf")


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "MISSING"


def check_env(pins: list[str]) -> list[str]:
    """On the GPU, after the install: every pinned distribution is installed at its version and its
    requirements hold against what is installed. Returns the problems."""
    from packaging.requirements import Requirement

    problems = []
    for name, version in sorted(parse_pins(pins).items()):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if distribution.version != version:
            problems.append(f"{name} is {distribution.version}, not {version} (an older copy shadows the wheel?)")
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{name} requires {text}: not installed")
                continue
            if requirement.specifier and not requirement.specifier.contains(have, prereleases=True):
                problems.append(f"{name} requires {text}: {requirement.name} {have} is installed (may still work)")
    return problems


# ---------------------------------------------------------------------------------------- results

# Lines of each step's output that carry its figures (the rest stays in the log).
FIGURE_LINES = {
    "install": (r"^installed: ",),
    "merge_fp32": (r"^one continual GCWM step", r"^inner-loop products", r"^peak CUDA memory", r"^device "),
    "merge_tf32": (r"^one continual GCWM step", r"^inner-loop products", r"^peak CUDA memory", r"^device "),
    "geometry": (
        r"^state-relative geometry of",
        r"^peak CUDA memory",
        r"^torch\.linalg\.svd",
        r"^right_basis",
        r"^device ",
    ),
    "assets": (r"^cpt assets: .* ready in", r"^assets: "),
    "eval_speed": (r"^model: ", r"^machine: ", r"^median wall", r"^median CPU", r"^max \|score difference\|"),
    "zero3": (r"^\| (plain|ZeRO-3)", r"^Same results"),
    "continual": (r"^\| gcwm|^\| sequential|^\| [a-z_]+ \| [a-z_]+ \|",),
}


def figures(step: str, log_text: str) -> list[str]:
    """The lines of ``log_text`` that carry ``step``'s figures (its last three lines when none match)."""
    patterns = [re.compile(p) for p in FIGURE_LINES.get(step, ())]
    lines = [line.rstrip() for line in log_text.splitlines()]
    picked = [line for line in lines if any(p.search(line) for p in patterns)]
    return picked or [line for line in lines if line.strip()][-3:]


def read_status(work: Path) -> list[dict]:
    rows = []
    status = work / "status.tsv"
    if status.is_file():
        for line in status.read_text().splitlines():
            step, state, code, seconds, budget, command = line.split("\t")
            rows.append(
                {"step": step, "state": state, "rc": code, "seconds": seconds, "budget": budget, "command": command}
            )
    return rows


def suite_section(work: Path, machine: str, date: str) -> str:
    """The body of RESULTS.md's "GPU suite" section: one row per step run so far, then each step's figure lines."""
    order = list(FIGURE_LINES)  # the suite's steps, in the order gpu_suite.sh runs them with --part all
    rows = sorted(read_status(work), key=lambda row: order.index(row["step"]) if row["step"] in order else len(order))
    table = ["| step | status | wall s | budget s | command |", "|---|---|---|---|---|"]
    excerpts = []
    for row in rows:
        state = row["state"] if row["state"] != "failed" else f"failed (exit {row['rc']})"
        command = row["command"].replace("|", "\\|")
        table.append(f"| {row['step']} | {state} | {row['seconds']} | {row['budget']} | `{command}` |")
        log = work / "logs" / f"{row['step']}.log"
        if log.is_file():
            excerpts.append(f"{row['step']}:\n" + "\n".join(figures(row["step"], log.read_text())))
    body = (
        "Every figure this project wants from a GPU, from one run of `benchmarks/gpu_suite.sh` on a bare "
        "machine (procedure: benchmarks/README.md). Steps that write their own section (ZeRO-3 vs plain, "
        "continual) are there in full as well.\n\n"
        f"- machine: {machine}\n- date: {date}\n\n" + "\n".join(table) + "\n"
    )
    if excerpts:
        body += "\nFigures (the lines of each step's output that carry them; full logs in gpu_suite.log):\n\n```text\n"
        body += "\n\n".join(excerpts) + "\n```\n"
    return body


def record(work: Path, machine: str) -> None:
    sys.path.insert(0, str(HERE))
    from results import replace_section

    replace_section(f"GPU suite ({machine})", suite_section(work, machine, datetime.date.today().isoformat()))


def record_continual(output: Path, command: str, machine: str) -> None:
    """The short continual run's compare table as its own section (the CPU section stays as it is)."""
    sys.path.insert(0, str(HERE))
    from results import replace_section

    table = (output / "compare.md").read_text()
    table = "\n".join(line for line in table.splitlines() if not line.startswith(("# ", "!["))).strip()
    replace_section(
        f"Continual benchmark (short, {machine})",
        "SmolLM2-135M-Instruct, BIG-bench plural → past tense → negation → question formation at the "
        f"CPU size (192 train / 48 test a task, 1 epoch).\n\n- command: `{command}`\n- machine: {machine}\n"
        f"- date: {datetime.date.today().isoformat()}\n\n{table}\n",
    )
    print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="tar asset-cache members and split them into .gpu_assets/part-NN")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chunk-mib", type=float, default=48)
    p.add_argument("members", nargs="+")
    p = commands.add_parser("assemble", help="stash carried chunks; extract them into the cache once all are there")
    p.add_argument("--assets", type=Path, required=True)
    p.add_argument("--stash", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--stash-only", action="store_true", help="only copy the chunks into the stash")
    p = commands.add_parser("check-wheels", help="does the wheel list cover the suite's imports on the GPU image")
    p.add_argument("--repo", type=Path, default=REPO)
    p.add_argument("--wheel-dir", type=Path, default=None)
    p.add_argument("pins", nargs="+")
    p = commands.add_parser("check-env", help="on the GPU after the install: pinned versions and their requirements")
    p.add_argument("pins", nargs="+")
    p = commands.add_parser("record", help="write the GPU suite section of RESULTS.md from the work folder")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--machine", required=True)
    p = commands.add_parser("record-continual", help="write the short continual run's section of RESULTS.md")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--command-line", required=True)
    p.add_argument("--machine", required=True)
    args = parser.parse_args(argv)

    if args.command == "pack":
        for chunk in pack(args.cache, args.members, args.out, args.chunk_mib):
            print(f"chunk {chunk.relative_to(args.out.parent) if args.out.parent != Path() else chunk} "
                  f"{chunk.stat().st_size / 2**20:.1f} MiB")  # fmt: skip
    elif args.command == "assemble":
        if args.stash_only:
            manifest = stash(args.assets, args.stash)
            held = sorted(p.name for p in args.stash.glob(f"{TAR_NAME}.*"))
            total = len(manifest["chunks"]) if manifest else "?"
            print(f"assets: stashed {len(held)} of {total} chunks in {args.stash}")
        else:
            members = assemble(args.assets, args.stash, args.cache)
            print(f"assets: {len(members)} cache entries in {args.cache}: {', '.join(members)}")
    elif args.command == "check-wheels":
        problems = check_wheels(args.repo, args.pins, args.wheel_dir)
        for problem in problems:
            print(f"gpu_suite: wheel list: {problem}")
        if problems:
            return 1
        print(f"wheels: {len(args.pins)} pinned wheels cover the suite's imports on the GPU image")
    elif args.command == "check-env":
        problems = check_env(args.pins)
        for problem in problems:
            print(f"warning: {problem}")
        print("installed: " + ", ".join(f"{name} {installed_version(name)}" for name in KEY_PACKAGES))
        return 1 if any("not installed" in p for p in problems) else 0
    elif args.command == "record":
        record(args.work, args.machine)
    elif args.command == "record-continual":
        record_continual(args.output, args.command_line, args.machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
