"""The balanced simulated dataset: every catalog item is the target of exactly ``per_item``
conversations, generated from threads and templates, cached in a folder keyed by the inputs.

Conversation layout: Seeker open; per thread element a Recommender question and a Seeker
preference; the Recommender's recommendation of the target (with a reason when one is drawn);
Seeker and Recommender goodbyes. Everything random is drawn with numpy in bulk, chunk by chunk,
from one generator seeded by ``seed``, so the output is byte-identical for equal inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.simulator.config import SimulationConfig
from lotcrs_plugin.data.simulator.mentions import NameMatcher
from lotcrs_plugin.data.simulator.mining import mine_templates
from lotcrs_plugin.data.simulator.reading import (  # noqa: F401  (the package's names, kept here)
    DATA_FILE, STATS_FILE, iter_simulated, load_simulated, load_stats,
)
from lotcrs_plugin.data.simulator.render import Compiled, Fillers, compile_template, render_turns
from lotcrs_plugin.data.simulator.templates import (
    BASE_SLOTS, ITEM, Template, builtin_templates, load_template_file,
)
from lotcrs_plugin.data.simulator.threads import ThreadSampler
from lotcrs_plugin.errors import UserError

# bump when the output for the same inputs changes (it keys the cache). 2: templates keep no
# genre word or name of their source dialog; built-in and file templates are checked alike
SIMULATOR_VERSION = 2
# files of the dataset folder that the simulation reads (their size and mtime key the cache)
INPUT_FILES = ("dataset.json", "entity2id.json", "item_ids.json", "item_stats.json", "entity_kg.json",
               "item_attributes.json", "train_data.json", "word2id.json", "token2id.json")
# A pool with fewer mined templates than this draws them less often (share * n / MIN_MINED_POOL),
# so that two mined templates do not say half of all director preferences.
MIN_MINED_POOL = 10
CHUNK_CONVERSATIONS = 16384    # conversations drawn and rendered at once (fixed: part of the output)

OPEN, ASK, PREFER, RECOMMEND, CLOSE_S, CLOSE_R = range(6)
_GREETING_RE = re.compile(r"\b(hi|hello|hey|howdy|good (morning|afternoon|evening)|how are you|"
                          r"welcome|can i help)\b", re.IGNORECASE)


def gini(counts: np.ndarray) -> float:
    """Gini index of a frequency distribution (0: all equal; near 1: one value holds all)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2.0 * np.sum(np.arange(1, n + 1) * x) / (n * total)) - (n + 1.0) / n)


class _Pools:
    """Template ids per (act, kind), split into built-in/file and mined, as flat arrays."""

    def __init__(self, templates: list[Template], slot_names: list[str]) -> None:
        self.keys: dict[tuple[str, str | None], int] = {}
        groups: dict[int, tuple[list[int], list[int]]] = {}

        def pool(act: str, kind: str | None) -> int:
            p = self.keys.setdefault((act, kind), len(self.keys))
            groups.setdefault(p, ([], []))
            return p

        for act in ("open", "close_seeker", "close_recommender"):
            pool(act, None)
        pool("recommend", None)
        for s in slot_names:
            pool("ask_first", s)
            pool("ask", s)
            pool("prefer", s)
            pool("recommend", s)
        for i, t in enumerate(templates):
            if t.act == "ask":
                # a greeting ("Hi! What do you like?") asks only the first question
                acts = ("ask_first",) if _GREETING_RE.search(t.text) else ("ask_first", "ask")
                kinds = slot_names if t.kind is None else [t.kind]
                targets = [self.keys[(a, k)] for a in acts for k in kinds if (a, k) in self.keys]
            else:
                targets = [self.keys[(t.act, t.kind)]] if (t.act, t.kind) in self.keys else []
            for p in targets:
                groups[p][1 if t.source == "mined" else 0].append(i)
        n = len(self.keys)
        flat: list[int] = []
        self.b_off = np.zeros(n, dtype=np.int64)
        self.b_cnt = np.zeros(n, dtype=np.int64)
        self.m_off = np.zeros(n, dtype=np.int64)
        self.m_cnt = np.zeros(n, dtype=np.int64)
        for p in range(n):
            b, m = groups[p]
            self.b_off[p], self.b_cnt[p] = len(flat), len(b)
            flat += b
            self.m_off[p], self.m_cnt[p] = len(flat), len(m)
            flat += m
        self.flat = np.asarray(flat + [0], dtype=np.int64)

    def size(self, act: str, kind: str | None) -> int:
        p = self.keys.get((act, kind))
        return 0 if p is None else int(self.b_cnt[p] + self.m_cnt[p])

    def choose(self, pool: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A template per entry of ``pool``: mined with probability ``share`` where the pool has
        at least MIN_MINED_POOL mined ones (proportionally less where it has fewer, always where
        it has only those). Returns (template ids, mined flags)."""
        u1 = rng.random(len(pool))
        u2 = rng.random(len(pool))
        m_cnt, b_cnt = self.m_cnt[pool], self.b_cnt[pool]
        p_mined = share * np.minimum(m_cnt, MIN_MINED_POOL) / MIN_MINED_POOL
        mined = (m_cnt > 0) & ((u1 < p_mined) | (b_cnt == 0))
        off = np.where(mined, self.m_off[pool], self.b_off[pool])
        cnt = np.where(mined, m_cnt, b_cnt)
        idx = off + np.minimum((u2 * cnt).astype(np.int64), np.maximum(cnt - 1, 0))
        return self.flat[idx], mined


def _load_json_if(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _templates(catalog: Catalog, folder: Path, config: SimulationConfig,
               matcher: NameMatcher) -> tuple[list[Template], dict]:
    known = tuple(dict.fromkeys(BASE_SLOTS + tuple(catalog.kinds)))
    templates: list[Template] = []
    if config.builtin_templates:
        templates += builtin_templates()
    if config.templates:
        templates += load_template_file(config.templates, known)
    report: dict[str, Any] = {}
    if config.mined_template_share > 0:
        mined, report = mine_templates(catalog, folder, config.max_template_tokens, config.mine_max_dialogs,
                                       matcher=matcher)
        templates += mined
    return templates, report


def generate(catalog: Catalog, folder: Path, config: SimulationConfig, out_file: Path,
             progress: bool = False) -> dict[str, Any]:
    """Write the simulated dialogs of ``catalog`` to ``out_file``; return the statistics."""
    started = time.perf_counter()
    slot_names = [ITEM] + list(catalog.kinds)
    unknown = sorted(set(config.kind_mix) - set(BASE_SLOTS) - set(slot_names))
    if unknown:
        raise UserError(f"simulation: kind_mix: unknown kind '{unknown[0]}'; known kinds: "
                        f"{', '.join(dict.fromkeys(list(BASE_SLOTS) + slot_names))}")
    unknown = sorted(set(config.related_via) - set(BASE_SLOTS) - set(slot_names) - {ITEM})
    if unknown or ITEM in config.related_via:
        bad = unknown[0] if unknown else ITEM
        raise UserError(f"simulation: related_via: '{bad}' is not an attribute kind; known kinds: "
                        f"{', '.join(dict.fromkeys(list(BASE_SLOTS[1:]) + slot_names[1:]))}")
    word2id = _load_json_if(folder / "word2id.json") or {}
    token2id = _load_json_if(folder / "token2id.json")
    matcher = NameMatcher(catalog)
    templates, mining_report = _templates(catalog, folder, config, matcher)

    # compile; a mined template that cannot be compiled is dropped, others are the user's error
    compiled: list[Compiled] = []
    kept: list[Template] = []
    n_naming = 0
    for t in templates:
        try:
            c = compile_template(t, word2id)
        except UserError:
            if t.source == "mined":
                continue
            raise
        if t.source != "mined":
            # what a turn says outside its slots must fit every thread: no genre, name or title
            said = matcher.in_template(t.text)
            if said is not None:
                if t.source == "file":
                    raise UserError(f"{config.templates}: template {t.text!r} names {said!r}, which not every "
                                    f"conversation is about; write it as a slot ([genre], [star], [item], ...)")
                n_naming += 1   # a built-in sentence that happens to be a name of this catalog
                continue
        compiled.append(c)
        kept.append(t)
    templates = kept
    if n_naming:
        mining_report = {**mining_report, "builtin_naming_catalog_names": n_naming}

    pools = _Pools(templates, slot_names)
    for act in ("open", "close_seeker", "close_recommender"):
        if pools.size(act, None) == 0:
            raise UserError(f"simulation: no template for the act '{act}'; keep builtin_templates "
                            f"on or give some in the templates file")
    if pools.size("recommend", None) == 0:
        raise UserError("simulation: no 'recommend' template with [item] alone; keep builtin_templates "
                        "on or give one in the templates file")
    # a kind is used in threads when weighted and when some template can say it
    weights = np.array([float(config.kind_mix.get(s, 0.0)) if pools.size("prefer", s) and
                        pools.size("ask", s) else 0.0 for s in slot_names])
    reason_ok = np.array([pools.size("recommend", s) > 0 for s in slot_names[1:]] + [False])
    via = np.array([float(config.related_via.get(k, 0.0)) for k in catalog.kinds])
    sampler = ThreadSampler(catalog, weights, via)
    fillers = Fillers.build(catalog, word2id)
    rng = np.random.default_rng(config.seed)

    n_items, per_item = catalog.n_items, config.per_item
    n_conv = n_items * per_item
    n_fill = n_items + catalog.n_attributes
    pool_of = pools.keys
    ask_pool = np.array([pool_of[("ask", s)] for s in slot_names], dtype=np.int64)
    ask_first_pool = np.array([pool_of[("ask_first", s)] for s in slot_names], dtype=np.int64)
    prefer_pool = np.array([pool_of[("prefer", s)] for s in slot_names], dtype=np.int64)
    rec_pool = np.array([pool_of[("recommend", s)] for s in slot_names[1:]] + [pool_of[("recommend", None)]],
                        dtype=np.int64)     # index by attribute kind, -1 (last) = no reason
    fixed_pool = np.array([pool_of[("open", None)], 0, 0, 0, pool_of[("close_seeker", None)],
                           pool_of[("close_recommender", None)]], dtype=np.int64)
    pre_min, pre_max = config.thread_min_length - 1, config.thread_max_length - 1
    item_eids = catalog.item_entity_ids.tolist()
    # kind of an attribute index; index -1 (no attribute) gives -1
    kind_of = np.append(catalog.attr_kind.astype(np.int64), -1)
    indptr = catalog.item_attr_indptr

    conv_counts = np.zeros(n_items, dtype=np.int64)
    tpl_usage = np.zeros(len(templates), dtype=np.int64)
    fill_usage = np.zeros(n_fill, dtype=np.int64)
    element_usage = np.zeros(len(slot_names), dtype=np.int64)
    reason_usage = np.zeros(len(slot_names), dtype=np.int64)   # index 0: no reason
    length_hist = np.zeros(pre_max + 1, dtype=np.int64)
    n_turns = n_mined = 0

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_conv, unit="conv", desc="simulating", dynamic_ncols=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "wb") as fh:
        fh.write(b"[\n")
        first_conv = True
        for lo in range(0, n_conv, CHUNK_CONVERSATIONS):
            hi = min(n_conv, lo + CHUNK_CONVERSATIONS)
            conv = np.arange(lo, hi)
            targets = conv // per_item
            th = sampler.sample(targets, rng, pre_min, pre_max)
            b = hi - lo
            width = th.element.shape[1]

            # the reason: the link of a random thread element, else a random attribute of the target
            via_ok = (th.via >= 0) & reason_ok[kind_of[th.via]]
            n_via = via_ok.sum(1)
            pick = np.minimum((rng.random(b) * n_via).astype(np.int64), np.maximum(n_via - 1, 0))
            col = np.argmax(np.cumsum(via_ok, axis=1) > pick[:, None], axis=1)
            reason = np.where(n_via > 0, th.via[np.arange(b), col], -1)
            deg = indptr[targets + 1] - indptr[targets]
            rpos = indptr[targets] + np.minimum((rng.random(b) * deg).astype(np.int64), np.maximum(deg - 1, 0))
            fallback = np.where(deg > 0, catalog.item_attr_indices[np.minimum(rpos, max(len(catalog.item_attr_indices) - 1, 0))]
                                if len(catalog.item_attr_indices) else -1, -1)
            fallback = np.where(reason_ok[kind_of[fallback]], fallback, -1)
            reason = np.where(reason >= 0, reason, fallback)
            reason = np.where(rng.random(b) < config.reason_prob, reason, -1)
            reason_kind = kind_of[reason]

            # the turn plan
            L = th.length
            nt = 4 + 2 * L
            starts = np.zeros(b, dtype=np.int64)
            np.cumsum(nt[:-1], out=starts[1:])
            total = int(nt.sum())
            cv = np.repeat(np.arange(b), nt)
            pos = np.arange(total) - starts[cv]
            Lr = L[cv]
            act = np.full(total, PREFER, dtype=np.int64)
            act[pos == 0] = OPEN
            act[(pos >= 1) & (pos <= 2 * Lr) & (pos % 2 == 1)] = ASK
            act[pos == 2 * Lr + 1] = RECOMMEND
            act[pos == 2 * Lr + 2] = CLOSE_S
            act[pos == 2 * Lr + 3] = CLOSE_R
            j = np.clip((pos - 1) // 2, 0, width - 1)
            el_slot = th.slot[cv, j]
            el = th.element[cv, j]
            pool = fixed_pool[act]
            is_ask, is_pref, is_rec = act == ASK, act == PREFER, act == RECOMMEND
            pool[is_ask] = np.where(pos[is_ask] == 1, ask_first_pool[el_slot[is_ask]], ask_pool[el_slot[is_ask]])
            pool[is_pref] = prefer_pool[el_slot[is_pref]]
            pool[is_rec] = rec_pool[reason_kind[cv[is_rec]]]
            tpl, mined = pools.choose(pool, config.mined_template_share, rng)
            f0 = np.where(is_pref, el, np.where(is_rec, targets[cv], 0))
            f1 = np.where(is_rec & (reason_kind[cv] >= 0), n_items + reason[cv], 0)

            # statistics
            conv_counts += np.bincount(targets, minlength=n_items)
            tpl_usage += np.bincount(tpl, minlength=len(templates))
            fill_usage += np.bincount(f0[is_pref | is_rec], minlength=n_fill)
            fill_usage += np.bincount(f1[f1 > 0], minlength=n_fill)
            element_usage += np.bincount(th.slot[th.slot >= 0], minlength=len(slot_names))
            reason_usage += np.bincount(reason_kind + 1, minlength=len(slot_names))
            length_hist += np.bincount(L, minlength=pre_max + 1)
            n_turns += total
            n_mined += int(mined.sum())

            # text
            k_in_item = conv % per_item
            tgt_eids = [item_eids[t] for t in targets.tolist()]
            heads = []
            for e, k in zip(tgt_eids, k_in_item.tolist()):
                heads.append((b'{' if first_conv else b']},\n{') + b'"conv_id":"sim-%d-%d","dialog":[' % (e, k))
                first_conv = False
            parts: list[bytes] = []
            render_turns(parts, compiled, fillers, tpl.tolist(), f0.tolist(), f1.tolist(), pos.tolist(),
                         (pos == 0).tolist(), heads)
            fh.write(b"".join(parts))
            if bar is not None:
                bar.update(b)
        fh.write(b"]}\n]\n" if not first_conv else b"]\n")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started

    is_mined = np.array([t.source == "mined" for t in templates], dtype=bool)
    by_act: dict[str, dict[str, int]] = {}
    for t, n in zip(templates, tpl_usage.tolist()):
        d = by_act.setdefault(t.act, {"turns": 0, "mined_turns": 0, "templates": 0, "mined_templates": 0})
        d["turns"] += n
        d["templates"] += 1
        if t.source == "mined":
            d["mined_turns"] += n
            d["mined_templates"] += 1
    for d in by_act.values():
        d["mined_share"] = round(d["mined_turns"] / d["turns"], 4) if d["turns"] else 0.0
    used_tokens: dict[str, None] = {}
    for c, n in zip(compiled, tpl_usage.tolist()):
        if n:
            used_tokens.update(dict.fromkeys(c.tokens))
    for f in np.nonzero(fill_usage)[0].tolist():
        used_tokens.update(dict.fromkeys(fillers.tokens[f]))
    new_tokens = sorted(t for t in used_tokens if token2id is not None and t not in token2id)
    counts_summary = {"min": int(conv_counts.min()), "max": int(conv_counts.max()),
                      "mean": float(conv_counts.mean())}
    return {
        "simulator_version": SIMULATOR_VERSION,
        "dataset_folder": str(folder),
        "conversations": int(n_conv),
        "turns": int(n_turns),
        "items": int(n_items),
        "per_item": per_item,
        "conversations_per_item": counts_summary,
        "items_with_exactly_per_item": int((conv_counts == per_item).sum()),
        "gini_target_frequency": round(gini(conv_counts), 6),
        "gini_real_train_mentions": round(gini(catalog.popularity), 6),
        "items_never_mentioned_in_train": int((catalog.popularity == 0).sum()),
        "items_without_attributes": int((np.diff(indptr) == 0).sum()),
        "thread_length_before_target": {str(i): int(n) for i, n in enumerate(length_hist.tolist())},
        "thread_elements_by_kind": {s: int(n) for s, n in zip(slot_names, element_usage.tolist())},
        "reasons_by_kind": {("none" if i == 0 else slot_names[i]): int(n)
                            for i, n in enumerate(reason_usage.tolist()) if i == 0 or i < len(slot_names)},
        "slots_filled_by_kind": _slot_usage(slot_names, element_usage, reason_usage, n_conv),
        "kind_weights_used": {s: float(w) for s, w in zip(slot_names, weights.tolist())},
        "mined_template_share": {"target": config.mined_template_share,
                                 "turns": round(n_mined / n_turns, 4) if n_turns else 0.0},
        "templates": {"builtin_or_file": int((~is_mined).sum()), "mined": int(is_mined.sum()),
                      "by_act": by_act},
        "mining": mining_report,
        "tokens_not_in_token2id": {"count": len(new_tokens), "tokens": new_tokens} if token2id is not None else None,
        "catalog": catalog.summary(),
        "config": config.to_dict(),
        "seconds": round(elapsed, 3),
        "conversations_per_item_by_entity_id": {str(e): int(n) for e, n in zip(item_eids, conv_counts.tolist())},
    }


def _slot_usage(slot_names: list[str], element_usage: np.ndarray, reason_usage: np.ndarray,
                n_conv: int) -> dict[str, int]:
    usage = {s: int(n) for s, n in zip(slot_names, element_usage.tolist())}
    usage[ITEM] += n_conv  # the target, once per conversation
    for i, n in enumerate(reason_usage.tolist()[1:], 1):
        usage[slot_names[i]] += int(n)
    return usage


# --------------------------------------------------------------------------- cache

def input_key(folder: Path, config: SimulationConfig) -> str:
    """Hash of what determines the output: the dataset files (name, size, mtime), the settings,
    the templates file's content and the simulator version."""
    h = hashlib.sha256()
    h.update(f"simulator {SIMULATOR_VERSION}\n".encode())
    for name in INPUT_FILES:
        p = folder / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name} {st.st_size} {st.st_mtime_ns}\n".encode())
        else:
            h.update(f"{name} -\n".encode())
    h.update(json.dumps(config.key_dict(), sort_keys=True).encode())
    if config.templates:
        p = Path(config.templates).expanduser()
        h.update(p.read_bytes() if p.is_file() else b"(missing)")
    return h.hexdigest()


def default_cache_dir() -> Path:
    from lotcrs_plugin.paths import active_layout

    return active_layout().data / "simulated"


def _complete(dest: Path, key: str) -> bool:
    stats = dest / STATS_FILE
    if not (stats.is_file() and (dest / DATA_FILE).is_file()):
        return False
    try:
        with open(stats, encoding="utf-8") as f:
            return json.load(f).get("input_key") == key
    except (OSError, json.JSONDecodeError):
        return False


def _destination(dataset_folder: str | os.PathLike, config: SimulationConfig | dict | None,
                 out_dir: str | os.PathLike | None) -> tuple[Path, SimulationConfig, Path, str]:
    if config is None:
        config = SimulationConfig()
    elif isinstance(config, dict):
        config = SimulationConfig.from_dict(config)
    config.validate()
    folder = Path(dataset_folder).expanduser().resolve()
    if not (folder / "entity2id.json").is_file() or not (folder / "item_ids.json").is_file():
        raise UserError(f"{folder} is not a processed dataset folder (no entity2id.json / item_ids.json); "
                        f"make one with `crslab import-data` (docs/DATA_LAYOUT.md)")
    if config.templates and not Path(config.templates).expanduser().is_file():
        raise UserError(f"simulation: templates file not found: {config.templates}")
    key = input_key(folder, config)
    if out_dir is not None:
        dest = Path(out_dir).expanduser().resolve()
        if dest.exists() and not dest.is_dir():
            raise UserError(f"{dest} exists and is not a folder; give another --out")
        if dest.is_dir() and any(dest.iterdir()) and not (dest / STATS_FILE).is_file():
            raise UserError(f"{dest} is a non-empty folder not made by the simulator (no {STATS_FILE}); "
                            f"give an empty or new folder")
    else:
        root = Path(config.cache_dir).expanduser().resolve() if config.cache_dir else default_cache_dir()
        dest = root / f"{folder.name}-{key[:16]}"
    return folder, config, dest, key


def find_simulated(dataset_folder: str | os.PathLike, config: SimulationConfig | dict | None = None, *,
                   out_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder :func:`simulate` would return, if it is already complete; else None."""
    _, _, dest, key = _destination(dataset_folder, config, out_dir)
    return dest if _complete(dest, key) else None


def simulate(dataset_folder: str | os.PathLike, config: SimulationConfig | dict | None = None, *,
             out_dir: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """The folder holding ``simulated_data.json`` and ``simulation_stats.json`` for a processed
    dataset folder; generated once, then found again by the hash of its inputs.

    Default place: ``<cache_dir>/<dataset folder name>-<hash>`` (cache_dir: the config's, else
    ``<root>/data/simulated``). ``out_dir``: write there instead (an earlier simulation there is
    replaced when its inputs differ; any other non-empty folder is refused). ``progress``: a
    tqdm bar on stderr.
    """
    folder, config, dest, key = _destination(dataset_folder, config, out_dir)
    if _complete(dest, key):
        return dest

    catalog = Catalog.from_folder(folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.simulating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        stats = generate(catalog, folder, config, tmp / DATA_FILE, progress=progress)
        stats = {"input_key": key, **stats}
        with open(tmp / STATS_FILE, "w", encoding="utf-8") as f:   # written last: marks completion
            json.dump(stats, f, ensure_ascii=False, indent=1)
        _move_into_place(tmp, dest, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _move_into_place(tmp: Path, dest: Path, key: str) -> None:
    if dest.exists():
        if _complete(dest, key):        # another process finished the same work meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
