"""The `simulation:` block: a CRSLab dataset serves the balanced simulated dialogs next to the
real splits, and with add_to_train any CRSLab model trains on them."""

from __future__ import annotations

from collections import Counter

import lotcrs_plugin
from lotcrs_plugin.runner import run

SMALL = {"n_items": 60, "n_conversations": 160, "seed": 5}


def _dataset(simulation: dict | None):
    lotcrs_plugin.register()
    from lotcrs_plugin import paths

    paths.apply_to_crslab()
    from crslab.data import get_dataset

    opt = {"dataset": "synthetic", "tokenize": "nltk", "synthetic": dict(SMALL)}
    if simulation is not None:
        opt["simulation"] = simulation
    return get_dataset(opt, "nltk", False, False)


def test_simulated_samples_served_and_balanced():
    plain = _dataset(None)
    assert plain.simulated_data == []
    served = _dataset({"per_item": 3, "seed": 1})
    assert len(served.train_data) == len(plain.train_data)  # not mixed in unless asked
    assert served.simulated_data
    # every catalog item is the last recommended item of exactly 3 conversations
    catalog = served.side_data["item_entity_ids"]
    last_items = Counter()
    by_context = {}
    for sample in served.simulated_data:
        if sample["role"] == "Recommender" and sample["items"]:
            key = id(sample["context_tokens"][0])
            by_context[key] = sample["items"][-1]
    # one conversation per first-turn object: its final recommended item is the target
    last_items.update(by_context.values())
    assert set(last_items) == set(catalog)
    assert set(last_items.values()) == {3}


def test_add_to_train_feeds_a_crslab_model():
    plain = _dataset(None)
    mixed = _dataset({"per_item": 2, "add_to_train": True})
    assert len(mixed.train_data) == len(plain.train_data) + len(mixed.simulated_data)

    def popularity(simulation: dict | None) -> dict[str, float]:
        opt = {"dataset": "synthetic", "tokenize": {"rec": "nltk"}, "synthetic": dict(SMALL),
               "rec_model": "Popularity", "context_truncate": 64, "item_truncate": 20, "evaluator": "rec",
               "rec": {"epoch": 1, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.001}, "lr_bert": 0.001}}
        if simulation is not None:
            opt["simulation"] = simulation
        return run(opt).test["rec"]

    with_simulated = popularity({"per_item": 2, "add_to_train": True})
    assert 0.0 <= with_simulated["hit@50"] <= 1.0
    # the model counted the simulated dialogs: item frequencies, hence the ranked lists, changed
    assert with_simulated != popularity(None)
