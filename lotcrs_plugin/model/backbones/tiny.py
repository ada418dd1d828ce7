"""The built-in tiny backbones: ``backbone_path: builtin:<spec>`` makes a demo/test backbone on
the spot, a random 2-layer BERT (hidden 64) whose WordPiece vocabulary is made from the dataset's
words, under ``<root>/data/model/builtin``. It needs no download; it is a demo/test backbone, not a
language model of any quality.

This module imports neither transformers nor the models (the config's early checks read
:data:`TINY_BACKBONE`); the folder is made when a model first resolves its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from loguru import logger

from lotcrs_plugin.errors import UserError

BUILTIN_PREFIX = "builtin:"
# name -> BertConfig arguments of the demo/test backbones made from the dataset's vocabulary
TINY_SPECS: dict[str, dict[str, int]] = {
    "tiny-bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                  "max_position_embeddings": 512},
}
TINY_BACKBONE = {"tiny-bert": "bert"}  # name -> the backbone kind (backbone: ...) it is
TINY_VERSION = 1  # bump when the made folder changes for the same vocabulary


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def tiny_vocabulary(vocab: Mapping[str, Any]) -> list[str]:
    """WordPiece vocabulary of a built-in tiny backbone: specials, the dataset's word tokens, the
    words of its entity names and of the simulator's built-in templates, and every printable
    character alone and as a continuation piece (so any ASCII word has a tokenization)."""
    from lotcrs_plugin.data.simulator.templates import BUILTIN

    words: set[str] = set()
    for token in vocab.get("tok2ind", {}):
        if isinstance(token, str) and not (token.startswith("__") and token.endswith("__")):
            words.update(_words(token))
    for name in vocab.get("entity2id", {}):
        words.update(_words(re.sub(r"[<>_/]", " ", str(name))))
    for texts in BUILTIN.values():
        for text in texts:
            words.update(_words(re.sub(r"\[[^\]]*\]", " ", text)))
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    body = sorted(w for w in words if w and w not in specials and " " not in w)
    out = list(dict.fromkeys(specials + chars + body + ["##" + c for c in string.ascii_lowercase + string.digits]))
    return out


def materialize_tiny(spec: str, vocab: Mapping[str, Any], root: Path) -> Path:
    """The folder of the built-in backbone ``spec`` for this vocabulary, made once under ``root``
    (keyed by a hash of spec and vocabulary; written to a temporary sibling, then renamed)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    if spec not in TINY_SPECS:
        raise UserError(f"backbone_path {BUILTIN_PREFIX}{spec}: unknown built-in backbone; "
                        f"known: {', '.join(BUILTIN_PREFIX + s for s in TINY_SPECS)}")
    words = tiny_vocabulary(vocab)
    key = hashlib.sha256(json.dumps([TINY_VERSION, spec, TINY_SPECS[spec], words]).encode()).hexdigest()[:16]
    dest = root / f"{spec}-{key}"
    if (dest / "config.json").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    if len(tokenizer) != len(words):
        raise RuntimeError(f"built-in {spec}: the tokenizer holds {len(tokenizer)} of {len(words)} tokens")
    tokenizer.save_pretrained(tmp)
    config = BertConfig(vocab_size=len(words), pad_token_id=0, **TINY_SPECS[spec])
    with torch.random.fork_rng(devices=[]):  # the same weights every time, global RNG untouched
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process made it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"[lotcrs] built-in backbone {spec}: {len(words)} WordPiece tokens -> {dest}")
    return dest


def resolve_backbone_path(name: str, path: Any, vocab: Mapping[str, Any]) -> Any:
    """``path`` itself, or for ``builtin:<spec>`` the folder of that tiny backbone (made from the
    dataset's vocabulary under ``<root>/data/model/builtin``)."""
    if not (isinstance(path, str) and path.startswith(BUILTIN_PREFIX)):
        return path
    spec = path[len(BUILTIN_PREFIX):]
    want = TINY_BACKBONE.get(spec)
    if want is not None and want != name:
        raise UserError(f"backbone_path {path} is a '{want}' backbone; set backbone: {want}")
    from lotcrs_plugin.paths import active_layout

    return str(materialize_tiny(spec, vocab, active_layout().model / "builtin"))


__all__ = ["BUILTIN_PREFIX", "TINY_BACKBONE", "TINY_SPECS", "materialize_tiny", "resolve_backbone_path", "tiny_vocabulary"]
