"""The conversation stage of the LOT-CRS system: after the recommender is trained and tested, a
causal LM (the ``conversation:`` block) learns the Recommender's responses of the real training
split, conditioned on the dialog context, the recommended item and the responses of the k
simulated contexts nearest to the real one (lotcrs_plugin.model.conversation.prompt); the epoch
with the best validation score (perplexity, or a generation metric) is kept and tested with
BLEU-1/2, Dist-1..4, perplexity and the share of replies that name an item
(lotcrs_plugin.evaluator.conversation). In ``--interact`` it writes the replies.

The recommender is reached through a :class:`RecView` (:class:`LOTCRSView` over the LOT-CRS
system): its top item and its context representation (the memory store's key space) for any
dialog prefix, and the simulated responses keyed by the same representation. The recommended
item of a validation or test sample is the recommender's top item for that context, as in a
conversation; in training it is the item the response names (``train_item: gold``; the
recommender's top item for responses that name none) or always the recommender's.

Files: ``<root>/save/<run>/`` (``conversation.run_name``, default ``<lotcrs run name>_conv``):
``decoder/`` (the kept epoch's model and tokenizer, save_pretrained), ``memory/`` (the simulated
responses and their keys), ``conversation.json`` (config, history, test metrics, example replies).
``--save-system`` copies decoder/ and memory/ to ``<model_file>.conv/``; ``--restore-system``
loads them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from loguru import logger

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.evaluator.conversation import ConversationMetrics
from lotcrs_plugin.hardware import bf16_autocast_pays
from lotcrs_plugin.model.conversation.config import BLOCK, ConversationConfig
from lotcrs_plugin.model.conversation.decoder import ConversationDecoder
from lotcrs_plugin.model.conversation.memory import ResponseMemory
from lotcrs_plugin.model.conversation.prompt import (
    SLOT, ConvSample, PromptEncoder, conversation_samples, fill_slot, slot_items, turn_text,
)
from lotcrs_plugin.system.optim import adamw_linear

SUMMARY = "conversation.json"
RANK_DEPTH = 50  # the recommender ranks its top 50 (CRSLab's depth; LOTCRSSystem.recommend ranks as deep)
EXAMPLES = 20    # test replies written to conversation.json


class RecView(Protocol):
    """What the stage needs from the recommender."""

    items: Any  # ItemVocab: display_names, index_of

    def dialogs(self, split: str) -> Sequence[Mapping[str, Any]]: ...

    def rec_pass(self, dialogs: Sequence[Mapping[str, Any]], samples: Sequence[tuple[int, int]]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(top item [n], context representation [n, H]) of the contexts ``dialogs[d]`` turns [0, t)."""

    def simulated_memory(self) -> ResponseMemory: ...


@dataclass
class Prepared:
    """A split's samples as token ids: prompts (with the item of ``item``), responses."""

    samples: list[ConvSample]
    prompts: list[list[int]]
    responses: list[list[int]]
    item: np.ndarray  # the recommended item of each sample's prompt and slot (catalog position)


class ConversationStage:
    """Train, select, test, save/load and reply; see the module docstring."""

    def __init__(self, cfg: ConversationConfig, run_dir: Path, device: torch.device, seed: int):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = device
        self.seed = seed
        self.autocast = cfg.bf16 and bf16_autocast_pays(device)
        self.decoder: ConversationDecoder | None = None
        self.memory: ResponseMemory | None = None
        self.encoder: PromptEncoder | None = None
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.report: dict[str, Any] | None = None

    @classmethod
    def from_opt(cls, opt: Any, save_root: Path, default_run: str, device: torch.device,
                 seed: int) -> "ConversationStage | None":
        """The stage of a config's ``conversation:`` block (its run folder under ``save_root``:
        run_name, else ``default_run``), or None when the block is absent or off."""
        try:
            cfg = ConversationConfig.from_dict(opt.get(BLOCK, None))
        except UserError as err:
            raise UserError(f"config: block '{BLOCK}': {err}") from None
        if not cfg.enabled:
            return None
        return cls(cfg, Path(save_root) / (cfg.run_name or default_run), device, cfg.seed if cfg.seed >= 0 else seed)

    # -- parts

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def set_decoder(self, decoder: ConversationDecoder) -> None:
        decoder.check_lengths(self.cfg)
        self.decoder = decoder.to(self.device)
        c = self.cfg
        self.encoder = PromptEncoder(decoder.tokenize, decoder.eos_id, max_context_length=c.max_context_length,
                                     max_prompt_length=c.max_prompt_length, max_response_length=c.max_response_length,
                                     retrieved_prompt=c.retrieved_prompt, recommended_item=c.recommended_item)

    def ensure_parts(self, view: RecView) -> None:
        """The decoder (backbone_path) and the simulated responses, where not loaded yet."""
        if self.decoder is None:
            self.set_decoder(ConversationDecoder.load(self.cfg.backbone_path))
        if self.memory is None and self.cfg.retrieved_prompt:
            started = time.perf_counter()
            self.memory = view.simulated_memory()
            logger.info(f"[conv] simulated responses: {len(self.memory)} entries "
                        f"({time.perf_counter() - started:.1f}s)")

    def prepare(self, view: RecView, split: str, *, train: bool) -> Prepared:
        """The samples of a split with the recommender's item and the retrieved responses."""
        started = time.perf_counter()
        dialogs = list(view.dialogs(split))
        samples = conversation_samples(dialogs, view.items)
        if not train and self.cfg.max_eval_samples:
            samples = samples[:self.cfg.max_eval_samples]
        if not samples:
            raise UserError(f"conversation: the {split} split has no Recommender turn after a first turn")
        top, queries = view.rec_pass(dialogs, [(s.dialog, s.turn) for s in samples])
        item = top.astype(np.int64).copy()
        if train and self.cfg.train_item == "gold":
            for i, s in enumerate(samples):
                if s.items:
                    item[i] = s.items[0]
        neighbours = self.memory.neighbours(queries, self.cfg.k) if self.memory is not None else [[]] * len(samples)
        names = view.items.display_names
        prompts = [self.encoder.prompt(s.context, n, names[int(i)]) for s, n, i in zip(samples, neighbours, item)]
        responses = [self.encoder.response(s.response) for s in samples]
        logger.info(f"[conv] {split}: {len(samples)} samples, {sum(map(len, prompts)) / len(prompts):.0f} prompt "
                    f"tokens on average ({time.perf_counter() - started:.1f}s)")
        return Prepared(samples, prompts, responses, item)

    # -- scores

    @torch.no_grad()
    def nll(self, data: Prepared) -> tuple[float, int]:
        """Summed negative log-likelihood of the responses and their token count."""
        self.decoder.eval()
        order = np.argsort([len(p) for p in data.prompts], kind="stable")
        total, count = 0.0, 0
        for lo in range(0, len(order), self.cfg.eval_batch_size):
            rows = order[lo:lo + self.cfg.eval_batch_size]
            with self._autocast():
                nll, n = self.decoder.response_nll([data.prompts[i] for i in rows], [data.responses[i] for i in rows])
            total, count = total + float(nll), count + n
        return total, count

    @torch.no_grad()
    def replies(self, data: Prepared, names: Sequence[str]) -> list[str]:
        """Generated replies with the slot filled by each sample's recommended item."""
        order = np.argsort([len(p) for p in data.prompts], kind="stable")
        out: list[str] = [""] * len(order)
        for lo in range(0, len(order), self.cfg.eval_batch_size):
            rows = order[lo:lo + self.cfg.eval_batch_size]
            with self._autocast():
                texts = self.decoder.generate([data.prompts[i] for i in rows], self.cfg, generator_seed=self.seed + lo)
            for i, text in zip(rows, texts):
                out[i] = fill_slot(text, names[int(data.item[i])])
        return out

    def evaluate(self, data: Prepared, names: Sequence[str], *, generate: bool) -> tuple[dict[str, Any], list[str]]:
        metrics = ConversationMetrics()
        metrics.add_nll(*self.nll(data))
        replies: list[str] = []
        if generate:
            replies = self.replies(data, names)
            for s, reply, item in zip(data.samples, replies, data.item):
                metrics.add_reply(reply, s.reference, names[int(item)].lower() in reply.lower(), bool(s.items))
        return metrics.report(), replies

    def _score(self, report: Mapping[str, Any]) -> float:
        value = report.get(self.cfg.select)
        return -math.inf if value is None else (-value if self.cfg.select == "ppl" else value)

    # -- training

    def fit(self, view: RecView) -> dict[str, Any]:
        """Train on the training split, keep the best validation epoch, test it; write the files."""
        started = time.perf_counter()
        c = self.cfg
        torch.manual_seed(self.seed)
        self.ensure_parts(view)
        train, valid = self.prepare(view, "train", train=True), self.prepare(view, "valid", train=False)
        batches = math.ceil(len(train.prompts) / c.batch_size)
        if c.max_train_batches:
            batches = min(batches, c.max_train_batches)
        model = self.decoder.model
        optimizer, scheduler = adamw_linear(model, lr=c.lr, weight_decay=c.weight_decay, warmup_ratio=c.warmup_ratio,
                                            total_steps=batches * c.epochs)
        logger.info(f"[conv] training {c.backbone_path} on {len(train.prompts)} responses: {batches} steps per epoch, "
                    f"{c.epochs} epochs, retrieved prompt {'on (k ' + str(c.k) + ')' if c.retrieved_prompt else 'off'}, "
                    f"recommended item {'on' if c.recommended_item else 'off'}")
        best_score, best_state, step = -math.inf, None, 0
        names = view.items.display_names
        for epoch in range(c.epochs):
            model.train()
            order = np.random.default_rng([self.seed, epoch]).permutation(len(train.prompts))
            losses: list[float] = []
            for b in range(batches):
                rows = order[b * c.batch_size:(b + 1) * c.batch_size]
                with self._autocast():
                    nll, n = self.decoder.response_nll([train.prompts[i] for i in rows],
                                                       [train.responses[i] for i in rows])
                loss = nll / max(1, n)
                loss.backward()
                if c.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                step += 1
                if step % c.log_every == 0:
                    logger.info(f"[conv] step {step}/{batches * c.epochs}: loss {np.mean(losses[-c.log_every:]):.4f}")
            report, _ = self.evaluate(valid, names, generate=c.select != "ppl")
            score = self._score(report)
            self.history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                                 "valid": report})
            if score > best_score:
                best_score, self.best_epoch = score, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            logger.info(f"[conv] epoch {epoch}: train loss {self.history[-1]['train_loss']:.4f}, validation "
                        f"{c.select} {report.get(c.select)}; best epoch {self.best_epoch}")
        if best_state is not None:
            model.load_state_dict(best_state)
        self.decoder.save(self.run_dir / "decoder")
        if self.memory is not None:
            self.memory.save(self.run_dir / "memory")
        report = self.test(view)
        self.write_summary(time.perf_counter() - started)
        return report

    def test(self, view: RecView) -> dict[str, Any]:
        """Perplexity and generation metrics on the test split (the current decoder)."""
        self.ensure_parts(view)
        test = self.prepare(view, "test", train=False)
        names = view.items.display_names
        self.report, replies = self.evaluate(test, names, generate=True)
        self.examples = [{"context": s.context[-1], "reference": s.reference, "recommended": names[int(i)],
                          "reply": r} for s, r, i in list(zip(test.samples, replies, test.item))[:EXAMPLES]]
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.report.items())
        logger.info(f"[conv] test ({self.cfg.decoding} decoding): {shown}")
        return self.report

    def write_summary(self, seconds: float) -> Path:
        path = self.run_dir / SUMMARY
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {"config": asdict(self.cfg), "best_epoch": self.best_epoch, "history": self.history,
                   "test": self.report, "examples": getattr(self, "examples", []), "seconds": round(seconds, 2)}
        path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        return path

    # -- the saved system

    def save(self, folder: Path) -> None:
        """decoder/ and memory/ of the tested stage (crslab run --save-system)."""
        if self.decoder is None:
            return
        self.decoder.save(Path(folder) / "decoder")
        if self.memory is not None:
            self.memory.save(Path(folder) / "memory")

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        if not (folder / "decoder").is_dir():
            raise UserError(f"restore-system: the conversation model {folder / 'decoder'} is missing; save the "
                            f"system again with conversation.enabled: true (or set it false)")
        self.set_decoder(ConversationDecoder.load(folder / "decoder"))
        if self.cfg.retrieved_prompt:
            self.memory = ResponseMemory.load(folder / "memory")

    # -- talking

    def reply(self, view: RecView, turns: Sequence[Mapping[str, Any]], item: int) -> str:
        """A generated reply to the dialog so far, its slot filled with catalog item ``item``."""
        self.ensure_parts(view)
        dialogs = [{"dialog": list(turns)}]
        _, queries = view.rec_pass(dialogs, [(0, len(turns))])
        neighbours = self.memory.neighbours(queries, self.cfg.k)[0] if self.memory is not None else []
        name = view.items.display_names[int(item)]
        prompt = self.encoder.prompt([turn_text(t) for t in turns], neighbours, name)
        with self._autocast():
            text = self.decoder.generate([prompt], self.cfg, generator_seed=self.seed)[0]
        return fill_slot(text, name)


# ---- the LOT-CRS system as the stage sees it --------------------------------------------------

class LOTCRSView:
    """:class:`RecView` over a :class:`~lotcrs_plugin.system.lotcrs.LOTCRSSystem` (its tested model)."""

    def __init__(self, system: Any):
        self.system = system
        self.items = system.model.items

    def dialogs(self, split: str) -> Sequence[Mapping[str, Any]]:
        return self.system.dialogs(split)

    @torch.no_grad()
    def rec_pass(self, dialogs: Sequence[Mapping[str, Any]], samples: Sequence[tuple[int, int]]
                 ) -> tuple[np.ndarray, np.ndarray]:
        from lotcrs_plugin.data.finetune_samples import RecData, RecIndex
        from lotcrs_plugin.data.turns import tokenize_dialogs

        s = self.system
        model, bb = s.model, s.model.backbone
        table = tokenize_dialogs(dialogs, bb.tokenizer, bb.sep_ids, model.items, s.entity2id)
        d = np.asarray([x[0] for x in samples], dtype=np.int64)
        start = table.dialog_offsets[d].astype(np.int64)
        contexts = np.stack([start, start + np.asarray([x[1] for x in samples], dtype=np.int64)], 1)
        n = len(samples)
        index = RecIndex(contexts, np.zeros(n, np.int64), np.zeros(n, bool), d)
        evidence = None  # the evidence term reads the whole context, as LOTCRSSystem.recommend builds it
        if getattr(model, "evidence", None) is not None:
            from lotcrs_plugin.data.context_evidence import EvidenceBuilder
            from lotcrs_plugin.data.finetune_samples import turn_roles

            evidence = EvidenceBuilder(table, turn_roles(dialogs), model.items.entity_ids)
        data = RecData(table, bb.input_format(s.cfg.max_length), bb.first_item_id, index, s.cfg.pad_to_multiple_of,
                       evidence)
        top = np.empty(n, np.int64)
        queries: np.ndarray | None = None
        was = model.training
        model.eval()
        for batch in s.batches(data, train=False):
            batch = batch.to(s.device)
            with s._autocast():
                ranking = model.rank_items(batch.tokens, None, RANK_DEPTH, s.cfg.eval_chunk_elements,
                                           evidence=batch.evidence)
                q = model.represent(batch.tokens).float().cpu().numpy()
            if queries is None:
                queries = np.empty((n, q.shape[1]), np.float32)
            idx = batch.sample_idx.cpu().numpy()
            top[idx] = ranking.top_ids[:, 0].cpu().numpy()
            queries[idx] = q
        model.train(was)
        return top, queries

    def simulated_memory(self) -> ResponseMemory:
        """The simulated samples of the memory store (the same rows: retrieval.max_per_item,
        sample_seed), keyed by the tested model (the space of its queries), with their responses:
        the turn that names the target, slotted."""
        from lotcrs_plugin.data.finetune_samples import per_item_rows

        s = self.system
        sim = s.data("simulated")
        cfg = s.retrieval_cfg
        rows = per_item_rows(sim.index.targets, cfg.max_per_item, cfg.sample_seed)
        keys, _ = s.encode_store_rows(rows)
        wanted = {int(t): i for i, t in enumerate(sim.index.contexts[rows, 1])}
        responses = [""] * len(rows)
        flat = 0
        for conv in s.dialogs("simulated"):
            for turn in conv["dialog"]:
                i = wanted.get(flat)
                if i is not None:
                    responses[i] = slot_items(turn_text(turn), turn.get("movies") or (), self.items)[0]
                flat += 1
        return ResponseMemory.build(keys, sim.index.targets[rows], responses, cfg)


__all__ = ["ConversationStage", "LOTCRSView", "Prepared", "RecView", "SLOT"]
