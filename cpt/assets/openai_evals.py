"""OpenAI-evals dataset assets: a samples file of the ``evals==3.0.1.post1`` wheel → chat rows and meta.

``openai-evals:<path under evals/registry/data>`` names a ``.jsonl`` samples file in the
chat format of the basic match evals; without the suffix the path names an eval folder and
means its ``samples.jsonl``. Each sample becomes ``{"messages", "input", "target",
"targets"}`` (+ ``"choices"``): ``messages`` is the sample's ``input`` conversation,
``input`` the content of its last user message, ``targets`` its ``ideal`` answers. The
registry's eval that uses the file (id, class, description) goes to ``meta.json``.
"""

from __future__ import annotations

import json
import zipfile
from typing import Any

from cpt.assets.cache import log
from cpt.assets.dataset_files import scalar_extras
from cpt.assets.did_you_mean import unknown_path_error
from cpt.assets.download import download_package
from cpt.assets.registry import DATASET_SOURCES, PINNED_PACKAGES
from cpt.errors import CptError

EVALS_DATA_ROOT = "evals/registry/data/"
EVALS_YAML_ROOT = "evals/registry/evals/"


def read_openai_evals(path: str) -> tuple[list[dict], dict]:
    """The rows and meta of the OpenAI evals samples file ``path`` (under ``evals/registry/data/``)."""
    wheel = download_package("evals", f"openai-evals:{path}")
    member = EVALS_DATA_ROOT + path
    with zipfile.ZipFile(wheel) as wheel_zip:
        names = wheel_zip.namelist()
        if member not in names:
            known = [
                name[len(EVALS_DATA_ROOT) :]
                for name in names
                if name.startswith(EVALS_DATA_ROOT) and name.endswith(".jsonl")
            ]
            folder = path.rsplit("/", 1)[0] + "/"
            in_folder = [known_path for known_path in known if known_path.startswith(folder)]
            if in_folder:
                raise CptError(
                    f"unknown OpenAI evals file '{path}'; that folder holds: "
                    + ", ".join(f"openai-evals:{known_path}" for known_path in in_folder[:10])
                )
            raise unknown_path_error("openai-evals", path, known, "OpenAI evals file")
        log(f"reading {member} from {wheel.name}…")
        text = wheel_zip.read(member).decode("utf-8", errors="replace")
        eval_info = _evals_yaml_info(wheel_zip, names, path)
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
        "version": PINNED_PACKAGES["evals"].version,
        "file": member,
        "license": DATASET_SOURCES["openai-evals"][2],
        "task_format": "chat",
        "task": eval_info,
    }
    return rows, meta


def _evals_row(path: str, lineno: int, example: Any) -> dict:
    where = f"openai-evals:{path} line {lineno}"
    bad = CptError(
        f"{where} is not in the chat format {{'input': [messages], 'ideal': ...}} "
        "of the basic match evals; pick another file"
    )
    if not isinstance(example, dict) or "input" not in example or example.get("ideal") is None:
        raise bad
    raw = example["input"]
    if isinstance(raw, str):
        messages = [{"role": "user", "content": raw}]
    elif (
        isinstance(raw, list)
        and raw
        and all(isinstance(message, dict) and "role" in message and "content" in message for message in raw)
    ):
        messages = [{"role": str(message["role"]), "content": _content_text(message["content"])} for message in raw]
    else:
        raise bad
    users = [message["content"] for message in messages if message["role"] == "user"]
    ideal = example["ideal"]
    targets = [str(answer) for answer in ideal] if isinstance(ideal, list) else [str(ideal)]
    if not targets:
        raise bad
    row: dict[str, Any] = {
        "messages": messages,
        "input": users[-1] if users else messages[-1]["content"],
        "target": targets[0],
        "targets": targets,
    }
    choices = example.get("choices")
    if isinstance(choices, list) and choices:
        row["choices"] = [str(choice) for choice in choices]
    row.update(scalar_extras(example, {"input", "ideal", "messages", "target", "targets", "choices"}))
    return row


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def _evals_yaml_info(wheel_zip: zipfile.ZipFile, names: list[str], path: str) -> dict:
    """The eval(s) of the registry that use ``path`` as samples: id, class, description."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        return {}
    needle = path.encode()
    info: dict[str, Any] = {}
    for name in names:
        if not (name.startswith(EVALS_YAML_ROOT) and name.endswith((".yaml", ".yml"))):
            continue
        raw = wheel_zip.read(name)
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
            info = {"eval": str(key), "class": spec.get("class"), "registry_file": name}
            if description:
                info["description"] = str(description).strip()
            return info
    return info
