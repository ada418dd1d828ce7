"""Why does the verbaliser learn less than a linear classifier on the same encoder? (issue 12, part 1)

One factor at a time on the LOT-CRS fine-tuning samples (the same rows, tokens and prompt as
``model: LOTCRS``), with a small training loop of its own so that each factor is isolated:

- the state read: the prompt's [MASK] position, the mean over the context, or [CLS];
- the head: the paper's verbaliser (BERT's MLM transform + decoder rows of the item tokens, tied to
  the input embeddings; fresh for MiniLM), a fresh linear layer over the items, or a dot product
  with item embeddings initialised from the item tokens' name-mean embeddings (untied copy);
- the learning rates of encoder and head;
- the item-token initialisation (name mean, or random).

Only validation is scored (best epoch on validation recall@10): these runs choose the model's
defaults, so the test split stays unseen.

    LOTCRS_HOME=/tmp/lh python benchmarks/diagnose_heads.py --dataset inspired_unicrs \
        --variant verbaliser_mask_1e-4 --variant linear_mean_5e-5_1e-3 --out benchmarks/results/head_diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

VARIANTS = {
    # name: (state, head, encoder lr, head lr, item init)
    "verbaliser_mask_1e-4": ("mask", "verbaliser", 1e-4, 1e-4, "name"),
    "verbaliser_mask_5e-5_1e-3": ("mask", "verbaliser", 5e-5, 1e-3, "name"),
    "verbaliser_mask_random_init": ("mask", "verbaliser", 1e-4, 1e-4, "random"),
    "linear_mask_5e-5_1e-3": ("mask", "linear", 5e-5, 1e-3, "name"),
    "linear_mean_5e-5_1e-3": ("mean", "linear", 5e-5, 1e-3, "name"),
    "linear_mean_1e-4": ("mean", "linear", 1e-4, 1e-4, "name"),
    "linear_cls_5e-5_1e-3": ("cls", "linear", 5e-5, 1e-3, "name"),
    "dot_mask_5e-5_1e-3": ("mask", "dot", 5e-5, 1e-3, "name"),
    "dot_mean_5e-5_1e-3": ("mean", "dot", 5e-5, 1e-3, "name"),
    "dot_mean_random_init": ("mean", "dot", 5e-5, 1e-3, "random"),
    # with the learned evidence term (lotcrs_plugin.model.evidence): context items and attributes
    "linear_mean_5e-5_1e-3+evidence": ("mean", "linear", 5e-5, 1e-3, "name"),
    "dot_mean_5e-5_1e-3+evidence": ("mean", "dot", 5e-5, 1e-3, "name"),
}


def load_splits(folder: Path, backbone_path: str, max_length: int, item_init: str):
    from lotcrs_plugin.data.finetune_samples import RecData, recommendation_index, turn_roles
    from lotcrs_plugin.data.item_vocab import ItemVocab
    from lotcrs_plugin.data.turns import tokenize_dialogs
    from lotcrs_plugin.model.backbones import build_backbone

    items = ItemVocab.from_folder(folder)
    entity2id = json.loads((folder / "entity2id.json").read_text(encoding="utf-8"))
    bb = build_backbone("bert", backbone_path)
    bb.add_item_tokens(items.display_names, items.entity_ids)
    if item_init == "random":
        emb = bb.model.get_input_embeddings().weight
        with torch.no_grad():
            rows = bb.item_token_ids
            emb[rows] = torch.randn(len(rows), emb.shape[1]) * emb[: rows[0]].std()
    from lotcrs_plugin.data.context_evidence import EvidenceBuilder

    data, evidence = {}, {}
    for split in ("train", "valid"):
        dialogs = json.loads((folder / f"{split}_data.json").read_text(encoding="utf-8"))
        table = tokenize_dialogs(dialogs, bb.tokenizer, bb.sep_ids, items, entity2id)
        roles = turn_roles(dialogs)
        index = recommendation_index(table, roles)
        data[split] = RecData(table, bb.input_format(max_length), bb.first_item_id, index)
        evidence[split] = EvidenceBuilder(table, roles, items.entity_ids)
    return bb, items, data, evidence


class Probe(nn.Module):
    """encoder state -> item scores, one variant."""

    def __init__(self, bb, state: str, head: str, evidence=None):
        super().__init__()
        self.evidence = evidence
        self.bb, self.state, self.head = bb, state, head
        hidden, n = bb.hidden_size, bb.n_items
        if head == "linear":
            self.out = nn.Linear(hidden, n)
            nn.init.normal_(self.out.weight, std=0.02)
            nn.init.zeros_(self.out.bias)
        elif head == "dot":
            rows = bb.model.get_input_embeddings().weight[bb.item_token_ids].detach().clone()
            self.items = nn.Parameter(rows)
            self.proj = nn.Linear(hidden, hidden)
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(hidden))
                self.proj.bias.zero_()
            self.bias = nn.Parameter(torch.zeros(n))
            self.scale = nn.Parameter(torch.tensor(1.0))

    def head_parameters(self):
        if self.head == "verbaliser":
            features, decoder = _head(self.bb)
            return list(features.parameters()) + [p for p in [getattr(self.bb.model.cls.predictions, "bias", None)]
                                                   if p is not None]
        return [p for n, p in self.named_parameters() if not n.startswith(("bb.", "evidence."))]

    def forward(self, tokens, ev=None) -> torch.Tensor:
        scores, h = self.scores(tokens)
        if self.evidence is not None:
            scores = scores.float() + self.evidence(h, ev)
        return scores

    def scores(self, tokens):
        hidden = self.bb.encode(tokens)
        if self.state == "mask":
            h = hidden[torch.arange(hidden.shape[0]), tokens.mask_positions]
        elif self.state == "cls":
            h = hidden[:, 0]
        else:
            m = tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
            h = (hidden * m).sum(1) / m.sum(1)
        if self.head == "verbaliser":
            return self.bb.item_logits(h), h
        if self.head == "linear":
            return self.out(h), h
        return self.scale * self.proj(h) @ self.items.t() + self.bias, h


def _head(bb):
    p = bb.model.cls.predictions
    return p.transform, p.decoder


def evaluate(model, data, evidence, batch_size: int = 64) -> dict[str, float]:
    from lotcrs_plugin.data.finetune_samples import IndexBatches

    model.eval()
    hits = {k: [] for k in (1, 10, 50)}
    mentioned = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for (rows,) in IndexBatches(len(data), batch_size, shuffle=False, lengths=data.lengths()):
            batch = data[rows]
            top = model(batch.tokens, evidence.batch(data.index.contexts[rows])).float().topk(50, dim=1).indices
            hit = top == batch.targets[:, None]
            for k in hits:
                hits[k].append(hit[:, :k].any(1).numpy())
            mentioned.append(batch.mentioned.numpy())
    model.train()
    m = np.concatenate(mentioned)
    out = {}
    for k, v in hits.items():
        v = np.concatenate(v)
        out[f"recall@{k}"] = float(v.mean())
        out[f"unmentioned:recall@{k}"] = float(v[~m].mean())
    return out


def run_variant(name: str, folder: Path, args) -> dict:
    from lotcrs_plugin.data.finetune_samples import IndexBatches

    from lotcrs_plugin.data.context_evidence import ItemAttributes
    from lotcrs_plugin.model.evidence import EvidenceConfig, EvidenceTerm

    state, head, lr_enc, lr_head, init = VARIANTS[name]
    torch.manual_seed(args.seed)
    bb, items, data, evidence = load_splits(folder, args.backbone_path, args.max_length, init)
    term = None
    if name.endswith("+evidence"):
        cfg = EvidenceConfig()
        term = EvidenceTerm(cfg, len(items), bb.hidden_size, ItemAttributes.from_folder(folder, items.entity_ids))
    model = Probe(bb, state, head, term)
    head_ids = {id(p) for p in model.head_parameters()}
    term_ids = {id(p) for p in term.parameters()} if term is not None else set()
    groups = [{"params": [p for p in model.parameters() if id(p) not in head_ids | term_ids], "lr": lr_enc},
              {"params": [p for p in model.parameters() if id(p) in head_ids], "lr": lr_head}]
    if term is not None:
        groups.append({"params": list(term.parameters()), "lr": cfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    train = data["train"]
    history, started = [], time.perf_counter()
    for epoch in range(args.epochs):
        for (rows,) in IndexBatches(len(train), args.batch_size, seed=args.seed, epoch=epoch,
                                    limit=args.max_batches):
            batch = train[rows]
            ev = evidence["train"].batch(train.index.contexts[rows])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(batch.tokens, ev)
            loss = F.cross_entropy(logits.float(), batch.targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        scores = evaluate(model, data["valid"], evidence["valid"])
        history.append({"epoch": epoch, **scores})
        print(f"{name} epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    if term is not None:
        print(f"{name} evidence weights: {term.weights()}", flush=True)
    best = max(history, key=lambda h: (h["recall@10"], -h["epoch"]))
    return {"variant": name, "state": state, "head": head, "lr_encoder": lr_enc, "lr_head": lr_head,
            "item_init": init, "best": best, "history": history, "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="inspired_unicrs")
    ap.add_argument("--backbone-path", default=os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batches", type=int, default=0, help="training batches per epoch (0: all; smoke runs)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file; results are appended per variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lotcrs_plugin import compat
    from lotcrs_plugin.paths import active_layout

    compat.apply()
    folder = active_layout().data / "dataset" / args.dataset
    done = json.loads(args.out.read_text()) if args.out.is_file() else {"cpu": cpu_name(), "runs": []}
    for name in args.variant or sorted(VARIANTS):
        result = run_variant(name, folder, args)
        result.update(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
        done["runs"] = [r for r in done["runs"] if r["variant"] != name] + [result]
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
