"""The patches of CRSLab's systems: the plateau scheduler, BaseSystem.backward, and nltk
tokenization without downloads."""

from __future__ import annotations

import re
from collections.abc import Callable

from lotcrs_plugin.compat.rebind import _module, _patch_method


# ---- ReduceLROnPlateau -----------------------------------------------------------------------

def _patch_plateau() -> None:
    """Symptom: `ReduceLROnPlateau.__init__() takes from 2 to 10 positional arguments but 11
    were given`: CRSLab's wrapper passes `verbose` positionally, which torch 2.x removed. The
    wrapper's __init__ is replaced by one passing keywords; `verbose` is accepted and ignored."""
    lr_scheduler = _module("crslab.system.utils.lr_scheduler")
    cls = lr_scheduler.ReduceLROnPlateau

    def make(original: Callable) -> Callable:
        def __init__(self, optimizer, mode="min", factor=0.1, patience=10, verbose=False,
                     threshold=0.0001, threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-08,
                     warmup_steps=0):
            lr_scheduler.LRScheduler.__init__(self, optimizer, warmup_steps)
            self.scheduler = lr_scheduler.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr, eps=eps)
        return __init__

    _patch_method(cls, "__init__", make, "plateau")


# ---- BaseSystem.backward ---------------------------------------------------------------------

def _patch_backward() -> None:
    """Symptom: every gradient is multiplied by the loss value: BaseSystem.backward calls
    `loss.backward(loss.clone().detach())`. Replaced by a plain `loss.backward()`, keeping the
    update_freq accumulation (loss divided by update_freq, parameters stepped every
    update_freq calls); the division is out of place, so the loss the caller logs is intact."""
    cls = _module("crslab.system.base").BaseSystem

    def make(original: Callable) -> Callable:
        def backward(self, loss):
            self._zero_grad()
            if self.update_freq > 1:
                self._number_grad_accum = (self._number_grad_accum + 1) % self.update_freq
                loss = loss / self.update_freq
            loss.backward()
            self._update_params()
        return backward

    _patch_method(cls, "backward", make, "backward")


# ---- nltk tokenization offline ---------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize without downloads: punkt sentence splitting when its data is
    installed, else a split after . ! ? followed by space; then nltk's Treebank-style word
    tokenizer (what word_tokenize applies to each sentence)."""
    import nltk
    from nltk.tokenize import NLTKWordTokenizer

    try:
        return nltk.word_tokenize(text)
    except LookupError:  # punkt / punkt_tab not installed
        tokenizer = NLTKWordTokenizer()
        return [tok for sent in _SENTENCE_END.split(text) if sent for tok in tokenizer.tokenize(sent)]


def _patch_nltk_offline() -> None:
    """Symptom: interactive mode calls nltk.download('punkt') on every message (no network:
    an error printed, then word_tokenize raises LookupError for punkt_tab). BaseSystem's
    nltk_tokenize is replaced by :func:`word_tokenize`, which never downloads."""
    cls = _module("crslab.system.base").BaseSystem

    def make(original: Callable) -> Callable:
        def nltk_tokenize(self, text):
            return word_tokenize(text)
        return nltk_tokenize

    _patch_method(cls, "nltk_tokenize", make, "nltk_offline")
