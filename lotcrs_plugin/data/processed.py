"""The CRSLab dataset class that reads a processed folder (docs/DATA_LAYOUT.md).

:class:`ProcessedDataset` produces exactly what CRSLab's ReDial / Inspired datasets produce
(processed samples, ``vocab``, ``side_data``), so that every CRSLab model and dataloader takes
it; ``side_data['item_stats']`` adds the per-item mention counts for the long-tail evaluator.

Differences from CRSLab's own datasets, on purpose:
- the data folder is ``<dataset root>/<name>`` (no tokenizer level) and CRSLab's download
  ``build()`` is never run on it; ``dpath`` (where ``all_data.pkl`` of ``--save_data`` /
  ``--restore_data`` and an optional ``embedding`` file live) is ``<folder>/<tokenize>``, so
  that two tokenizations never share a pickle;
- a malformed folder raises :class:`UserError` naming the file, instead of a KeyError later;
  an item that is not in item_ids.json is an error, not silently dropped;
- KG edges, entity lists and relation ids are in a fixed order (CRSLab iterates sets).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import numpy as np

from lotcrs_plugin import compat
from lotcrs_plugin.data.processed_folder import SPLITS, FolderData, _checked_turns, _dialog_of, check_folder
from lotcrs_plugin.errors import UserError

compat.apply()  # crslab is imported only through the patches

from crslab.data.dataset.base import BaseDataset  # noqa: E402
from loguru import logger  # noqa: E402

TOKENIZERS = ("nltk", "bert", "gpt2")
NLTK_SPECIAL_IDX = {"pad": 0, "start": 1, "end": 2, "unk": 3, "pad_entity": 0, "pad_word": 0}
SELF_LOOP = "SELF_LOOP"


class ProcessedDataset(BaseDataset):
    """CRSLab dataset over a processed folder: ``<dataset root>/<opt['dataset']>``, or the folder
    a subclass made by :func:`dataset_class_for` is bound to.

    tokenize: 'nltk' uses the stored word tokens and token2id.json; 'bert' / 'gpt2' tokenize
    each turn's raw_text with ``transformers.AutoTokenizer`` loaded from the local folder
    ``opt['pretrained_path'][tokenize]``, whose vocabulary and special tokens become ``vocab``.
    """

    dataset_name: ClassVar[str | None] = None
    bound_folder: ClassVar[Path | None] = None

    def __init__(self, opt, tokenize, restore=False, save=False):
        # BaseDataset.__init__ minus build(): nothing is downloaded into our folders
        if tokenize not in TOKENIZERS:
            raise UserError(f"tokenize {tokenize!r} is not supported by dataset "
                            f"{self._name(opt)!r}; use one of {', '.join(TOKENIZERS)}")
        self.tokenize = tokenize
        self.opt = opt
        self.folder = Path(self.resolve_folder(opt))
        self.dpath = str(self.folder / tokenize)
        if not restore:
            train_data, valid_data, test_data, self.vocab = self._load_data()
            logger.info("[Finish data load]")
            self.train_data, self.valid_data, self.test_data, self.side_data = self._data_preprocess(
                train_data, valid_data, test_data)
            embedding = opt.get("embedding", None)
            if embedding:
                path = os.path.join(self.dpath, embedding)
                if not os.path.isfile(path):
                    raise UserError(f"embedding: {path} does not exist (a .npy file of shape "
                                    f"[vocab_size, dim] in the dataset's {tokenize} folder)")
                self.side_data["embedding"] = np.load(path)
                logger.debug(f"[Load pretrained embedding {embedding}]")
            logger.info("[Finish data preprocess]")
        else:
            self.train_data, self.valid_data, self.test_data, self.side_data, self.vocab = \
                self._load_from_restore()
        if save:
            data = (self.train_data, self.valid_data, self.test_data, self.side_data, self.vocab)
            self._save_to_one(data)

    # -- where the data is

    @classmethod
    def _name(cls, opt) -> str:
        return cls.dataset_name or (opt.get("dataset", None) if opt is not None else None) or "?"

    def resolve_folder(self, opt) -> Path:
        """The processed folder to read (override to generate one on demand)."""
        if self.bound_folder is not None:
            return self.bound_folder
        from lotcrs_plugin.paths import active_layout

        name = self._name(opt)
        folder = active_layout().dataset / name
        if not (folder / "dataset.json").is_file():
            raise UserError(f"dataset {name!r}: no processed folder at {folder} (expected "
                            f"dataset.json there; make one with `crslab import-data`)")
        return folder

    def _load_from_restore(self, file_name="all_data.pkl"):
        if not os.path.exists(os.path.join(self.dpath, file_name)):
            raise UserError(f"restore_data: {os.path.join(self.dpath, file_name)} does not exist; "
                            f"run once with save_data first")
        return super()._load_from_restore(file_name)

    # -- BaseDataset hooks

    def _load_data(self):
        self.raw = FolderData(self.folder)
        raw = self.raw
        self.entity2id = raw.entity2id
        self.id2entity = {idx: e for e, idx in raw.entity2id.items()}
        self.word2id = raw.word2id
        self.n_entity = max(raw.entity2id.values()) + 1
        self.n_word = max(raw.word2id.values(), default=0) + 1
        if self.tokenize == "nltk":
            self.tok2ind = raw.token2id
            self.special_token_idx = dict(NLTK_SPECIAL_IDX)
            self._turn_ids = None
        else:
            self._load_pretrained_tokenizer()
        self.ind2tok = {idx: tok for tok, idx in self.tok2ind.items()}
        self.unk_token_idx = self.special_token_idx["unk"]
        vocab = {
            "tok2ind": self.tok2ind,
            "ind2tok": self.ind2tok,
            "entity2id": self.entity2id,
            "id2entity": self.id2entity,
            "word2id": self.word2id,
            "vocab_size": len(self.tok2ind),
            "n_entity": self.n_entity,
            "n_word": self.n_word,
        }
        vocab.update(self.special_token_idx)
        return raw.splits["train"], raw.splits["valid"], raw.splits["test"], vocab

    def _load_pretrained_tokenizer(self) -> None:
        paths = self.opt.get("pretrained_path", None)
        path = paths.get(self.tokenize) if isinstance(paths, dict) else None
        if not path:
            raise UserError(f"tokenize {self.tokenize!r} needs the config key pretrained_path: "
                            f"{{{self.tokenize}: <local folder with a {self.tokenize} tokenizer>}}")
        if not Path(path).is_dir():
            raise UserError(f"pretrained_path.{self.tokenize}: {path} is not a folder")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"pretrained_path.{self.tokenize}: no tokenizer could be loaded from "
                            f"{path} ({str(e).splitlines()[0]})") from None
        self.tokenizer = tok
        self.tok2ind = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
        self.special_token_idx = _pretrained_special_idx(tok)
        texts = [utt.get("raw_text") if isinstance(utt, dict) else None
                 for utt in self.raw.iter_turns()]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise UserError(f"{self.folder}: a turn has no \"raw_text\" string (turn #{bad} over "
                            f"train, valid, test); tokenize {self.tokenize!r} reads raw_text")
        # one batched call: fast tokenizers run it in Rust
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        self._turn_ids = iter(ids)

    def _data_preprocess(self, train_data, valid_data, test_data):
        folder = self.folder
        processed = [self._raw_data_process(data, folder / f"{split}_data.json")
                     for split, data in zip(SPLITS, (train_data, valid_data, test_data))]
        logger.debug("[Finish train/valid/test data process]")
        self.simulated_data: list[dict] = []
        if self.opt.get("simulation", None) is not None:
            self.simulated_data = self._simulated_samples()
            from lotcrs_plugin.data.simulator import SimulationConfig

            if SimulationConfig.from_dict(self.opt["simulation"]).add_to_train:
                processed[0] = processed[0] + self.simulated_data
        side_data = self._side_data_process()
        logger.debug("[Finish side data process]")
        # the raw dialogs are no longer needed; dataset.json stays available
        self.manifest = self.raw.manifest
        self.raw = self._turn_ids = None
        return processed[0], processed[1], processed[2], side_data

    def _simulated_samples(self) -> list[dict]:
        """Samples of the balanced simulated dialogs (config block `simulation:`), generated once
        per dataset and settings, then read from the cache; streamed, never loaded whole."""
        from lotcrs_plugin.data.simulator import SimulationConfig, iter_simulated, simulate

        sim_folder = simulate(self.folder, SimulationConfig.from_dict(self.opt["simulation"]))
        path = sim_folder / "simulated_data.json"
        dialogs = iter_simulated(sim_folder)
        saved_turn_ids = self._turn_ids
        if saved_turn_ids is not None:  # a pretrained tokenizer: one batched call over the raw texts
            dialogs = list(dialogs)
            texts = [utt["raw_text"] for conv in dialogs for utt in _dialog_of(path, conv)]
            self._turn_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        samples = self._raw_data_process(dialogs, path)
        self._turn_ids = saved_turn_ids
        logger.info(f"[Simulated data: {len(samples)} samples from {sim_folder}]")
        return samples

    def _raw_data_process(self, raw_data: Iterable, path: Path) -> list[dict]:
        items = set(self.raw.item_ids)
        samples: list[dict] = []
        for conv in raw_data:
            merged = self._merge_conv(self._id_turns(path, conv, items))
            samples.extend(self._augment_and_add(merged))
        return samples

    def _id_turns(self, path: Path, conv: Any, items: set) -> Iterator[tuple[str, list, list, list, list]]:
        tok2ind, unk, turn_ids = self.tok2ind, self.unk_token_idx, self._turn_ids
        for utt, movie_ids, entity_ids, word_ids in _checked_turns(path, conv, self.entity2id,
                                                                   self.word2id, items):
            if turn_ids is None:
                text_ids = [tok2ind.get(w, unk) for w in utt["text"]]
            else:
                text_ids = list(next(turn_ids))
            yield utt["role"], text_ids, movie_ids, entity_ids, word_ids

    @staticmethod
    def _merge_conv(turns: Iterable[tuple[str, list, list, list, list]]) -> list[dict]:
        """Consecutive turns of one role become one (as CRSLab's ReDial/Inspired do)."""
        merged: list[dict] = []
        last_role = None
        for role, text, movies, entities, words in turns:
            if role == last_role:
                m = merged[-1]
                m["text"] += text
                m["movie"] += movies
                m["entity"] += entities
                m["word"] += words
            else:
                merged.append({"role": role, "text": text, "entity": entities, "movie": movies,
                               "word": words})
            last_role = role
        return merged

    @staticmethod
    def _augment_and_add(raw_conv_dict: list[dict]) -> list[dict]:
        """One sample per turn after the first, with everything said before it as context
        (CRSLab's ReDialDataset._augment_and_add)."""
        samples = []
        context_tokens, context_entities, context_words, context_items = [], [], [], []
        entity_set, word_set = set(), set()
        for conv in raw_conv_dict:
            text_tokens, entities, movies, words = conv["text"], conv["entity"], conv["movie"], conv["word"]
            if context_tokens:
                samples.append({
                    "role": conv["role"],
                    "context_tokens": list(context_tokens),
                    "response": text_tokens,
                    "context_entities": list(context_entities),
                    "context_words": list(context_words),
                    "context_items": list(context_items),
                    "items": movies,
                })
            context_tokens.append(text_tokens)
            context_items += movies
            for entity in entities + movies:
                if entity not in entity_set:
                    entity_set.add(entity)
                    context_entities.append(entity)
            for word in words:
                if word not in word_set:
                    word_set.add(word)
                    context_words.append(word)
        return samples

    def _side_data_process(self) -> dict:
        raw = self.raw
        return {
            "entity_kg": self._entity_kg_process(),
            "word_kg": self._word_kg_process(),
            "item_entity_ids": list(raw.item_ids),
            "item_stats": {int(i): raw.item_stats[str(i)] for i in raw.item_ids},
        }

    def _entity_kg_process(self) -> dict:
        """Inspired's KG processing: both directions of every triple plus a self loop for each
        entity in a triple; edges deduplicated. Relation ids by first appearance, the self loop
        right after the first relation, as Inspired numbers them."""
        heads, rel_names, tails = self.raw.entity_triples
        if len(heads) == 0:
            # RGCN needs at least one edge: self loops for the items
            items = np.asarray(self.raw.item_ids, dtype=np.int64)
            edges = np.stack([items, items, np.zeros_like(items)], axis=1)
            relation2id = {SELF_LOOP: 0}
        else:
            relation2id = {}
            for r in [rel_names[0], SELF_LOOP, *rel_names[1:]]:
                relation2id.setdefault(r, len(relation2id))
            rel = np.asarray([relation2id[r] for r in rel_names], dtype=np.int64)
            nodes = np.unique(np.concatenate([heads, tails]))
            loop = np.full(len(nodes), relation2id[SELF_LOOP], dtype=np.int64)
            edges = np.concatenate([
                np.stack([heads, tails, rel], axis=1),
                np.stack([tails, heads, rel], axis=1),
                np.stack([nodes, nodes, loop], axis=1),
            ])
        edges = np.unique(edges, axis=0)
        nodes = np.unique(edges[:, :2])
        return {
            "edge": [tuple(e) for e in edges.tolist()],
            "n_relation": len(relation2id),
            "relation2id": dict(relation2id),
            "entity": sorted(self.id2entity[i] for i in nodes.tolist()),
        }

    def _word_kg_process(self) -> dict:
        pairs = self.raw.word_pairs
        edges = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)
        id2word = {i: w for w, i in self.word2id.items()}
        return {
            "edge": [tuple(e) for e in edges.tolist()],
            "entity": sorted(id2word[i] for i in np.unique(edges).tolist()),
        }


def _pretrained_special_idx(tok) -> dict:
    """pad/start/end/unk from a Hugging Face tokenizer, in CRSLab's roles: start is [CLS]
    (else BOS), end is [SEP] (else EOS). A tokenizer without a pad token (GPT-2) pads with id 0,
    as CRSLab's own gpt2 resources do."""
    def first(*ids):
        return next((i for i in ids if i is not None), None)

    idx = {
        "pad": first(tok.pad_token_id, 0),
        "start": first(tok.cls_token_id, tok.bos_token_id),
        "end": first(tok.sep_token_id, tok.eos_token_id),
        "unk": first(tok.unk_token_id, tok.eos_token_id, tok.sep_token_id),
        "pad_entity": 0,
        "pad_word": 0,
    }
    missing = [k for k, v in idx.items() if v is None]
    if missing:
        raise UserError(f"the tokenizer {getattr(tok, 'name_or_path', '')!r} has no token for "
                        f"{', '.join(missing)} (needs [CLS]/BOS and [SEP]/EOS)")
    return idx


# ---- classes bound to a folder ---------------------------------------------------------------

_bound_classes: dict[tuple[str, Path], type] = {}


def dataset_class_for(name: str, folder: str | os.PathLike) -> type:
    """A ProcessedDataset subclass that reads ``folder``, to register as dataset ``name``.

    The folder is checked now (files present, dataset.json valid). The same (name, folder)
    gives the same class, so registering it twice is not a conflict.
    """
    folder = Path(folder).resolve()
    key = (name, folder)
    cls = _bound_classes.get(key)
    if cls is None:
        check_folder(folder)
        cls = type(f"Processed_{name}", (ProcessedDataset,), {
            "dataset_name": name,
            "bound_folder": folder,
            "__module__": __name__,
            "__doc__": f"Processed dataset {name!r} read from {folder}.",
        })
        _bound_classes[key] = cls
    return cls
