"""ProcessedDataset: the processed layout read as CRSLab's datasets are, fed to CRSLab's own
dataloaders; malformed folders are UserErrors naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lotcrs_plugin import paths
from lotcrs_plugin.data.processed import ProcessedDataset, dataset_class_for
from lotcrs_plugin.data.processed_folder import check_folder, scan, validate_folder
from lotcrs_plugin.data.synthetic.config import SyntheticConfig
from lotcrs_plugin.data.synthetic.generator import generate
from lotcrs_plugin.errors import UserError

SMALL = SyntheticConfig(n_items=60, n_conversations=60, turns=6, n_people=40, seed=5)
OPT = {"context_truncate": 64, "response_truncate": 20, "item_truncate": 10, "entity_truncate": 10,
       "word_truncate": 10}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """LOTCRS_HOME in tmp_path, applied to CRSLab; the previous root is restored afterwards."""
    before = paths.active_layout().root
    monkeypatch.setenv("LOTCRS_HOME", str(tmp_path))
    layout = paths.apply_to_crslab()
    yield layout
    paths.apply_to_crslab(before)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return generate(SMALL, tmp_path_factory.mktemp("processed") / "src")


def copy_of(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def load(folder: Path, name: str):
    with open(folder / name, encoding="utf-8") as f:
        return json.load(f)


def dataset(folder: Path, tokenize: str = "nltk", name: str = "mydata", **opt):
    cls = dataset_class_for(name, folder)
    return cls({"dataset": name, **OPT, **opt}, tokenize)


def test_round_trip_matches_the_files(source):
    ds = dataset(source)
    token2id, entity2id = load(source, "token2id.json"), load(source, "entity2id.json")
    train = load(source, "train_data.json")
    # one sample per turn after the first (consecutive turns of one role would merge)
    assert len(ds.train_data) == sum(len(c["dialog"]) - 1 for c in train)
    first = train[0]["dialog"]
    sample = ds.train_data[0]
    assert sample["role"] == first[1]["role"]
    assert sample["context_tokens"] == [[token2id[w] for w in first[0]["text"]]]
    assert sample["response"] == [token2id[w] for w in first[1]["text"]]
    assert sample["items"] == [entity2id[m] for m in first[1]["movies"]]
    assert sample["context_entities"] == [entity2id[e] for e in first[0]["entity"] + first[0]["movies"]]
    assert set(sample) == {"role", "context_tokens", "response", "context_entities", "context_words",
                           "context_items", "items"}
    v = ds.vocab
    assert v["vocab_size"] == len(token2id) and v["n_entity"] == max(entity2id.values()) + 1
    assert v["n_word"] == max(load(source, "word2id.json").values()) + 1
    assert v["ind2tok"][3] == "__unk__" and v["id2entity"][1] == next(iter(entity2id))
    assert {k: v[k] for k in ("pad", "start", "end", "unk", "pad_entity", "pad_word")} == \
        {"pad": 0, "start": 1, "end": 2, "unk": 3, "pad_entity": 0, "pad_word": 0}
    for split in (ds.valid_data, ds.test_data):
        assert split and all(i in ds.side_data["item_entity_ids"] for s in split for i in s["items"])


def test_side_data_is_crslab_shaped(source):
    sd = dataset(source).side_data
    triples = load(source, "entity_kg.json")
    edges = set(sd["entity_kg"]["edge"])
    rel_names = list(dict.fromkeys(r for _, r, _ in triples))
    assert sd["entity_kg"]["n_relation"] == len(rel_names) + 1  # + SELF_LOOP
    self_loop = 1  # Inspired numbers it right after the first relation
    rel_id = {r: i if i == 0 else i + 1 for i, r in enumerate(rel_names)}
    for h, r, t in triples:
        assert {(h, t, rel_id[r]), (t, h, rel_id[r]), (h, h, self_loop), (t, t, self_loop)} <= edges
    assert len(edges) == len(sd["entity_kg"]["edge"])
    assert all(type(x) is int for e in sd["entity_kg"]["edge"][:50] for x in e)
    word_edges = set(sd["word_kg"]["edge"])
    assert all((a, b) in word_edges and (b, a) in word_edges for a, b in load(source, "word_kg.json"))
    assert sd["item_entity_ids"] == load(source, "item_ids.json")
    stats = load(source, "item_stats.json")
    assert sd["item_stats"] == {int(k): v for k, v in stats.items()}


def test_feeds_crslab_dataloaders(source):
    from crslab.data import KBRDDataLoader, TGReDialDataLoader

    ds = dataset(source)
    items = set(ds.side_data["item_entity_ids"])
    tg = TGReDialDataLoader(OPT, ds.train_data, ds.vocab)
    context, mask, input_ids, target_pos, input_mask, negs, y = next(iter(tg.get_rec_data(16)))
    assert context.shape[0] == 16 and context.shape[1] <= OPT["context_truncate"]
    assert set(y.tolist()) <= items
    conv = next(iter(tg.get_conv_data(16, shuffle=False)))
    assert all(isinstance(t, torch.Tensor) for t in conv)
    kb = KBRDDataLoader(OPT, ds.valid_data, ds.vocab)
    rec = next(iter(kb.get_rec_data(8)))
    assert set(rec["item"].tolist()) <= items and len(rec["context_entities"]) == len(rec["item"])
    conv = next(iter(kb.get_conv_data(8)))
    assert conv["response"][:, 0].eq(ds.vocab["start"]).all()


def test_unbound_class_reads_dataset_root_and_saves_per_tokenizer(source, home):
    folder = copy_of(source, home.dataset / "mydata")
    assert scan(home.dataset) == {"mydata": folder}
    opt = {"dataset": "mydata", **OPT}
    ds = ProcessedDataset(opt, "nltk", restore=False, save=True)
    assert Path(ds.dpath) == folder / "nltk" and (folder / "nltk" / "all_data.pkl").is_file()
    back = ProcessedDataset(opt, "nltk", restore=True)
    assert back.train_data == ds.train_data and back.vocab == ds.vocab
    with pytest.raises(UserError, match="save_data"):
        ProcessedDataset({"dataset": "mydata"}, "bert", restore=True)
    with pytest.raises(UserError, match="no processed folder"):
        ProcessedDataset({"dataset": "absent"}, "nltk")


def test_unknown_tokenize_lists_the_valid_ones(source):
    with pytest.raises(UserError, match="nltk, bert, gpt2"):
        dataset(source, tokenize="spacy")


def test_bert_tokenize_uses_the_local_tokenizer(source, tmp_path):
    with pytest.raises(UserError, match="pretrained_path"):
        dataset(source, tokenize="bert")
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        w for w in load(source, "token2id.json") if not w.startswith("__"))[:-20]  # some unknown
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.save_pretrained(tmp_path / "bert")
    ds = dataset(source, tokenize="bert", pretrained_path={"bert": str(tmp_path / "bert")})
    v = ds.vocab
    assert (v["pad"], v["start"], v["end"], v["unk"]) == (0, 2, 3, 1)
    assert v["vocab_size"] == len(words) and v["tok2ind"]["[CLS]"] == 2
    first = load(source, "train_data.json")[0]["dialog"]
    assert ds.train_data[0]["response"] == tok(first[1]["raw_text"], add_special_tokens=False)["input_ids"]
    assert any(1 in s["response"] for s in ds.train_data)  # [UNK] for the missing words


def test_bound_class_is_stable_and_registrable(source):
    from lotcrs_plugin.registry import register_dataset

    a = dataset_class_for("mydata_reg", source)
    assert dataset_class_for("mydata_reg", source) is a and issubclass(a, ProcessedDataset)
    register_dataset("mydata_reg", a, "en")
    register_dataset("mydata_reg", dataset_class_for("mydata_reg", source), "en")  # no conflict


def test_synthetic_dataset_through_crslab_get_dataset(home):
    import lotcrs_plugin
    from crslab.data import get_dataset

    lotcrs_plugin.register()
    paths.apply_to_crslab(home.root)
    cfg = {"n_items": 50, "n_conversations": 40, "turns": 4, "seed": 1}
    ds = get_dataset({"dataset": "synthetic", "synthetic": cfg, **OPT}, "nltk", False, False)
    key = SyntheticConfig.from_dict(cfg).key()
    assert ds.folder == home.dataset / "synthetic" / key
    assert len(ds.side_data["item_entity_ids"]) == 50 and ds.train_data
    with pytest.raises(UserError, match="known keys"):
        get_dataset({"dataset": "synthetic", "synthetic": {"size": 3}}, "nltk", False, False)


def edit_json(folder: Path, name: str, change) -> None:
    data = load(folder, name)
    data = change(data) or data
    (folder / name).write_text(json.dumps(data), encoding="utf-8")


def first_valid_movie_to_unknown(data):
    for conv in data:
        for turn in conv["dialog"]:
            if turn["movies"]:
                turn["movies"][0] = "Not A Movie (1999)"
                return data


MALFORMED = {
    "missing item_ids": ("item_ids.json", lambda f: (f / "item_ids.json").unlink()),
    "broken json": ("entity2id.json", lambda f: (f / "entity2id.json").write_text('{"a": 1,\n "b"', "utf-8")),
    "wrong format": ("dataset.json", lambda f: edit_json(f, "dataset.json", lambda d: d.update(format="x"))),
    "too few items": ("item_ids.json", lambda f: edit_json(f, "item_ids.json", lambda d: d[:10])),
    "unknown movie": ("valid_data.json", lambda f: edit_json(f, "valid_data.json", first_valid_movie_to_unknown)),
    "special token": ("token2id.json", lambda f: edit_json(f, "token2id.json", lambda d: d.pop("__unk__") and None)),
    "kg id": ("entity_kg.json", lambda f: edit_json(f, "entity_kg.json", lambda d: d.append([1, "genre", 10**6]))),
    "bad turn": ("train_data.json", lambda f: edit_json(f, "train_data.json",
                                                         lambda d: d[0]["dialog"][0].update(role="Bot"))),
    "no stats": ("item_stats.json", lambda f: edit_json(f, "item_stats.json", lambda d: d.pop("1") and None)),
    "empty split": ("test_data.json", lambda f: edit_json(f, "test_data.json", lambda d: d.clear())),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_folder_names_the_file(case, source, tmp_path):
    name, damage = MALFORMED[case]
    folder = copy_of(source, tmp_path / case.replace(" ", "_"))
    damage(folder)
    with pytest.raises(UserError, match=name.replace(".", r"\.")) as e:
        validate_folder(folder)
    assert "\n" not in str(e.value)
    if case == "broken json":
        assert "line 2" in str(e.value)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        dataset(folder, name=case)


def test_check_folder_is_cheap_and_strict(source, tmp_path):
    assert check_folder(source)["name"] == "synthetic"
    folder = copy_of(source, tmp_path / "f")
    (folder / "word_kg.json").unlink()
    with pytest.raises(UserError, match=r"word_kg\.json"):
        check_folder(folder)
    with pytest.raises(UserError, match=r"word_kg\.json"):
        dataset_class_for("f", folder)
