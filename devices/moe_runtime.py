"""The on-device MoE runtime for an export of converters/moe_offload.py, in numpy only (a board
needs python3 + numpy; this file never imports torch or edgesparse): the backbone stays resident,
experts are loaded on demand into a cache that never holds more than its byte budget.

    python3 moe_runtime.py out/moe --policy predictive --budget 0.25 --tokens 256 --json

The budget (a fraction of all expert bytes; 1 = everything resident, loaded at start) is split
across layers in proportion to their expert bytes, and each layer evicts within its share.
Loading (`--io`): `read` (default) preads a blob into a slot of a fixed arena allocated once;
`mmap` maps it (MAP_POPULATE) and unmaps it on eviction.

Policies: `lru`; `lfu` (use counts over the whole run, ties by recency); `predictive`: LRU for
demand loads, plus prefetching on a worker thread: as soon as layer l has routed, layer l+1's
router is applied to the current hidden state (mixed with the export's inter-layer affinity table
P(expert at l+1 | expert at l) by the export's calibrated weight) and the top-k experts are
loaded in the background while layer l's experts and layer l+1's attention compute; a prefetch
only evicts an expert the predictor rates less likely. Layer 0 is predicted from the token
embedding when the step starts.

Integrity: every blob's size is checked when the runtime starts and at each load; its sha256 the
first time it is loaded in this process (and again if its size, mtime or inode changed since,
e.g. a re-export). A missing, truncated or corrupt blob raises EdgesparseError; output is never
computed from unverified bytes. (With io=mmap, a blob rewritten in place while it is mapped is
not detected; exports replace files by rename, which leaves mapped pages intact.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mmap
import os
import queue
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # one BLAS thread unless told otherwise; must precede the numpy import
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np

FORMAT = "edgesparse-moe-offload"
VERSION = 1
POLICIES = ("lru", "lfu", "predictive")
IO_MODES = ("read", "mmap")


def check_budget(budget) -> None:
    """An expert budget is a fraction of the expert bytes in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise _error_type()(f"expert budget must be a fraction in (0, 1], got {budget!r}")


def _error_type():
    """edgesparse's EdgesparseError when edgesparse is loaded (the CLI turns it into one line);
    on a board without edgesparse, a stand-in with the same (message, hint) shape."""
    errors = sys.modules.get("edgesparse.errors")
    if errors is not None:
        return errors.EdgesparseError

    class EdgesparseError(Exception):
        def __init__(self, message: str, hint: str | None = None):
            super().__init__(message)
            self.message, self.hint = message, hint

        def __str__(self):
            return f"{self.message} ({self.hint})" if self.hint else self.message

    return EdgesparseError


EdgesparseError = _error_type()


# ---------------------------------------------------------------------------------------------
# the export on disk


def load_manifest(path: str | os.PathLike) -> tuple[dict, Path]:
    """(manifest, export dir) from `dir` or `dir/moe.json`."""
    path = Path(path)
    file = path if path.is_file() else path / "moe.json"
    if not file.is_file():
        raise EdgesparseError(f"no MoE export at {path} (no moe.json there)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise EdgesparseError(f"{file} is not a readable MoE manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EdgesparseError(f"{file} is not an edgesparse MoE offload manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise EdgesparseError(f"{file}: manifest version {manifest.get('version')} is not supported (this runtime reads {VERSION})")
    for key in ("config", "backbone", "experts", "expert_bytes_total"):
        if key not in manifest:
            raise EdgesparseError(f"{file}: the manifest has no {key!r}")
    return manifest, file.parent


def _layout(tensors: dict) -> list[tuple]:
    """(name, dtype, count, offset, shape) per tensor of a blob (little-endian)."""
    return [(name, np.dtype(t["dtype"]).newbyteorder("<"), int(np.prod(t["shape"], dtype=np.int64)), t["offset"],
             tuple(t["shape"])) for name, t in tensors.items()]


def _views(buffer, layout: list[tuple]) -> dict:
    """name -> array over `buffer` at the manifest's offsets (no copy)."""
    return {name: np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
            for name, dtype, count, offset, shape in layout}


def _check_size(path: Path, spec: dict, what: str) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise EdgesparseError(f"{what} is missing: {path}", hint="re-export the model") from None
    if st.st_size != spec["bytes"]:
        raise EdgesparseError(f"{what} {path.name} has {st.st_size} bytes, the manifest says {spec['bytes']} "
                              "(truncated or replaced)", hint="re-export the model")
    return st


def _corrupt(path: Path, what: str):
    return EdgesparseError(f"{what} {path.name} is corrupt: its sha256 does not match the manifest",
                           hint="re-export the model")


# ---------------------------------------------------------------------------------------------
# math (float32 throughout; the same formulas as edgesparse.models.tiny_moe)


def layer_norm(x, w, b, eps):
    mean = x.mean()
    d = x - mean
    var = (d * d).mean()
    return d / np.sqrt(var + np.float32(eps)) * w + b


def _erf(x):
    # Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7): numpy has no erf, and a board may lack scipy
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(np.float32)


def activation(name: str, x):
    if name == "silu":
        with np.errstate(over="ignore"):
            return x / (np.float32(1) + np.exp(-x))
    if name == "relu":
        return np.maximum(x, np.float32(0))
    if name == "gelu_tanh":
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x * x * x)))
    if name == "gelu":
        return np.float32(0.5) * x * (np.float32(1) + _erf(x * np.float32(1 / math.sqrt(2))))
    raise EdgesparseError(f"unknown expert activation {name!r}")


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits, k: int):
    """Indices of the k largest logits, largest first (ties: lower index first)."""
    return np.argsort(-logits, kind="stable")[:k]


def rope_tables(head_dim: int, position: int, base: float):
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.float64(position) * inv_freq
    angles = np.concatenate([angles, angles])
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def _matvec(arrays: dict, name: str, x):
    """Linear layer `name` on one vector: fp32 weights, or int8 with a per-output-row scale."""
    w = arrays[name + ".weight"]
    if w.dtype == np.int8:
        y = (w.astype(np.float32) @ x) * arrays[name + ".scale"]
    else:
        y = w @ x
    bias = arrays.get(name + ".bias")
    return y + bias if bias is not None else y


def expert_forward(arrays: dict, act: str, x):
    if "gate.weight" in arrays:
        h = activation(act, _matvec(arrays, "gate", x)) * _matvec(arrays, "up", x)
    else:
        h = activation(act, _matvec(arrays, "up", x))
    return _matvec(arrays, "down", h)


# ---------------------------------------------------------------------------------------------
# the expert cache


class _Entry:
    __slots__ = ("key", "nbytes", "mm", "slot", "arrays", "ready", "last_use", "pins", "prefetched")

    def __init__(self, key, nbytes: int, prefetched: bool):
        self.key, self.nbytes, self.prefetched = key, nbytes, prefetched
        self.mm = self.slot = self.arrays = None
        self.ready, self.last_use, self.pins = False, 0, 0


class ExpertCache:
    """Experts (layer, expert) loaded from their blobs into a fixed number of bytes.

    The budget is split across layers in proportion to their expert bytes (equal shares for
    equal layers), and each layer's policy evicts within its own share, as in Mixtral-offloading's
    per-layer cache: layers are visited in a fixed cycle, so one pool under LRU would evict exactly
    the next layer's experts. Resident plus in-flight bytes never exceed a layer's share, so the
    whole cache never exceeds the budget.

    io="read": each layer's share is one arena of expert-sized slots, allocated once; a load is
    one pread into a free slot, an eviction frees the slot (no system call). io="mmap": each
    expert is mapped (MAP_POPULATE) on load and unmapped on eviction, so its bytes are resident
    only while cached.

    The compute thread `acquire`s an expert (loading it on a miss) and `release`s it; `prefetch`
    reserves room and hands the load to a worker thread. One condition variable guards all
    state; files are read outside it.
    """

    def __init__(self, base: Path, specs: list[list[dict]], budget: float, policy: str, io: str = "read",
                 drop_evicted: bool = False):
        if io not in IO_MODES:
            raise EdgesparseError(f"unknown expert io {io!r} (available: {', '.join(IO_MODES)})")
        self.base, self.specs, self.policy, self.io, self.drop_evicted = base, specs, policy, io, drop_evicted
        self.slot_bytes = [max(s["bytes"] for s in experts) for experts in specs]
        layer_bytes = [sum(s["bytes"] for s in experts) for experts in specs]
        self.quota = [b if budget >= 1 else int(math.floor(budget * b)) for b in layer_bytes]
        if io == "read":  # whole slots; an expert smaller than its layer's largest still takes a slot
            self.quota = [q // sb * sb for q, sb in zip(self.quota, self.slot_bytes)]
            self.arenas = [np.empty(q, np.uint8) for q in self.quota]  # pages are touched (resident) on first load
            self.free_slots = [list(range(q // sb - 1, -1, -1)) for q, sb in zip(self.quota, self.slot_bytes)]
        self.budget_bytes = sum(self.quota)
        # per expert, resolved once: (path, bytes, sha256, tensor layout, name for errors)
        self.plan = {(l, e): (str(base / s["file"]), s["bytes"], s["sha256"], _layout(s["tensors"]),
                              f"expert blob (layer {l}, expert {e})")
                     for l, experts in enumerate(specs) for e, s in enumerate(experts)}
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.layer_used = [0] * len(specs)
        self.used_bytes = self.max_used_bytes = 0
        self.cond = threading.Condition()
        self.clock = 0
        self.uses: dict[tuple[int, int], int] = {}
        self.verified: dict[tuple[int, int], tuple] = {}
        self.stats = self._zero_stats()
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None

    @staticmethod
    def _zero_stats() -> dict:
        return dict(requests=0, hits=0, ready_hits=0, prefetch_hits=0, misses=0, demand_loads=0,
                    prefetch_loads=0, prefetch_useful=0, prefetch_wasted=0, prefetch_skipped=0,
                    prefetch_failed=0, evictions=0, stall_ms=0.0, demand_load_ms=0.0,
                    prefetch_load_ms=0.0, verified_blobs=0)

    # -- loading ------------------------------------------------------------------------------
    def charge(self, key) -> int:
        """Bytes of the layer's share an expert takes: its slot (read) or its blob (mmap)."""
        return self.slot_bytes[key[0]] if self.io == "read" else self.specs[key[0]][key[1]]["bytes"]

    def _load(self, entry: _Entry):
        """(mmap or None, arrays) for one expert blob: its size checked every time, its sha256
        the first time (or when the file changed since), all bytes in memory before compute."""
        key = entry.key
        path, nbytes, sha256, layout, what = self.plan[key]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise EdgesparseError(f"{what} is missing: {path}", hint="re-export the model") from None
        mm = None
        try:
            st = os.fstat(fd)
            if st.st_size != nbytes:
                raise EdgesparseError(f"{what} {Path(path).name} has {st.st_size} bytes, the manifest says {nbytes} "
                                      "(truncated or replaced)", hint="re-export the model")
            identity = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self.io == "read":
                sb = self.slot_bytes[key[0]]
                data = self.arenas[key[0]][entry.slot * sb:entry.slot * sb + nbytes]
                if os.preadv(fd, [data], 0) != nbytes:
                    raise EdgesparseError(f"{what} {Path(path).name} was truncated while reading", hint="re-export the model")
            else:
                mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
                data = mm
        finally:
            os.close(fd)
        if self.verified.get(key) != identity:
            if hashlib.sha256(data).hexdigest() != sha256:
                del data
                if mm is not None:
                    mm.close()
                raise _corrupt(Path(path), what)
            self.verified[key] = identity
            self.stats["verified_blobs"] += 1
        elif mm is not None and not getattr(mmap, "MAP_POPULATE", 0):
            np.frombuffer(mm, np.uint8)[::mmap.PAGESIZE].sum()  # fault the pages in here, not in compute
        return mm, _views(data, layout)

    def _release_storage(self, entry: _Entry):
        entry.arrays = None  # drop the numpy views first: an exported buffer blocks mm.close()
        if entry.mm is not None:
            entry.mm.close()
            entry.mm = None
        if entry.slot is not None:
            self.free_slots[entry.key[0]].append(entry.slot)
            entry.slot = None
        if self.drop_evicted:  # model a device without room to keep evicted experts in the page cache
            spec = self.specs[entry.key[0]][entry.key[1]]
            try:
                fd = os.open(self.base / spec["file"], os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                pass

    # -- space (all with the lock held) ---------------------------------------------------------
    def _free(self, layer: int) -> int:
        return self.quota[layer] - self.layer_used[layer]

    def _victim(self, layer: int):
        """The expert of `layer` a demand load evicts: ready and unpinned; LFU: fewest uses over
        the run (then least recent); LRU and predictive: least recently used."""
        best, best_rank = None, None
        for key, e in self.entries.items():
            if key[0] != layer or not e.ready or e.pins:
                continue
            rank = (self.uses.get(key, 0), e.last_use) if self.policy == "lfu" else (e.last_use,)
            if best_rank is None or rank < best_rank:
                best, best_rank = e, rank
        return best

    def _drop(self, entry: _Entry):
        del self.entries[entry.key]
        self.layer_used[entry.key[0]] -= entry.nbytes
        self.used_bytes -= entry.nbytes
        self._release_storage(entry)
        self.cond.notify_all()

    def _least_likely(self, layer: int, probs):
        best, best_rank = None, None
        for key, e in self.entries.items():
            if key[0] == layer and e.ready and not e.pins:
                rank = (probs[key[1]], e.last_use)
                if best_rank is None or rank < best_rank:
                    best, best_rank = e, rank
        return best

    def _evict(self, entry: _Entry):
        self.stats["evictions"] += 1
        if entry.prefetched:
            self.stats["prefetch_wasted"] += 1
        self._drop(entry)

    def _reserve(self, key):
        """Make room for `key` in its layer's share, evicting by policy; wait for that layer's
        in-flight prefetches when nothing else can go."""
        layer, need = key[0], self.charge(key)
        while self._free(layer) < need:
            victim = self._victim(layer)
            if victim is not None:
                self._evict(victim)
            elif any(not e.ready for k, e in self.entries.items() if k[0] == layer):
                t0 = time.perf_counter()
                self.cond.wait()
                self.stats["stall_ms"] += (time.perf_counter() - t0) * 1e3
            else:
                raise RuntimeError(f"expert cache: layer {layer} needs {need} B but its {self.quota[layer]} B are pinned")

    def _insert(self, key, prefetched: bool) -> _Entry:
        entry = _Entry(key, self.charge(key), prefetched)
        if self.io == "read":
            entry.slot = self.free_slots[key[0]].pop()
        self.entries[key] = entry
        self.layer_used[key[0]] += entry.nbytes
        self.used_bytes += entry.nbytes
        self.max_used_bytes = max(self.max_used_bytes, self.used_bytes)
        assert self.layer_used[key[0]] <= self.quota[key[0]] and self.used_bytes <= self.budget_bytes, \
            "expert cache over its byte budget"
        return entry

    # -- the compute thread -------------------------------------------------------------------
    def resident(self, key) -> bool:
        with self.cond:
            return key in self.entries

    def acquire(self, key) -> dict:
        """The expert's arrays, pinned until `release(key)`."""
        with self.cond:
            self.stats["requests"] += 1
            self.clock += 1
            self.uses[key] = self.uses.get(key, 0) + 1
            entry = self.entries.get(key)
            if entry is not None and entry.ready:
                self.stats["ready_hits"] += 1
            while entry is not None and not entry.ready:  # a prefetch in flight: wait for it
                t0 = time.perf_counter()
                self.cond.wait()
                self.stats["stall_ms"] += (time.perf_counter() - t0) * 1e3
                entry = self.entries.get(key)  # gone if the prefetch failed
            if entry is not None:
                self.stats["hits"] += 1
                if entry.prefetched:
                    entry.prefetched = False
                    self.stats["prefetch_hits"] += 1
                    self.stats["prefetch_useful"] += 1
                entry.pins += 1
                entry.last_use = self.clock
                return entry.arrays
            self.stats["misses"] += 1
            self._reserve(key)
            entry = self._insert(key, prefetched=False)
        t0 = time.perf_counter()
        try:
            mm, arrays = self._load(entry)
        except BaseException:
            with self.cond:
                self._drop(entry)
            raise
        with self.cond:
            self.stats["demand_loads"] += 1
            self.stats["demand_load_ms"] += (time.perf_counter() - t0) * 1e3
            entry.mm, entry.arrays, entry.ready = mm, arrays, True
            entry.pins, entry.last_use = 1, self.clock
            self.cond.notify_all()
            return arrays

    def release(self, key):
        with self.cond:
            self.entries[key].pins -= 1

    def prefetch(self, layer: int, experts: list[int], probs) -> None:
        """Start loading `experts` of `layer` (most likely first) on the worker thread. Room is
        made only by evicting a ready, unpinned expert the predictor rates less likely (`probs`,
        per expert of the layer) than the one coming in, so a prefetch never displaces a
        better bet; an expert that does not fit is skipped."""
        with self.cond:
            for e in experts:
                key = (layer, e)
                if key in self.entries:
                    continue
                need = self.charge(key)
                while self._free(layer) < need:
                    victim = self._least_likely(layer, probs)
                    if victim is None or probs[victim.key[1]] >= probs[e]:
                        break
                    self._evict(victim)
                if self._free(layer) < need:
                    self.stats["prefetch_skipped"] += 1
                    continue
                self._insert(key, prefetched=True).last_use = self.clock
                self.stats["prefetch_loads"] += 1
                self._start_worker()
                self._queue.put(key)

    def load_all(self):
        """All-resident mode: load every expert now (start-up, not cache behaviour)."""
        for layer, experts in enumerate(self.specs):
            for e in range(len(experts)):
                self.acquire((layer, e))
                self.release((layer, e))
        verified = self.stats["verified_blobs"]
        self.stats = self._zero_stats()
        self.stats["verified_blobs"] = verified
        self.uses.clear()

    # -- the worker -------------------------------------------------------------------------
    def _start_worker(self):
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="expert-prefetch", daemon=True)
            self._worker.start()

    def _work(self):
        while True:
            key = self._queue.get()
            if key is None:
                return
            t0 = time.perf_counter()
            with self.cond:
                entry = self.entries[key]
            try:
                mm, arrays = self._load(entry)
            except Exception:  # a bad blob: drop the reservation; the compute thread's own load reports it
                with self.cond:
                    self.stats["prefetch_failed"] += 1
                    self._drop(entry)
                continue
            with self.cond:
                entry.mm, entry.arrays, entry.ready = mm, arrays, True
                self.stats["prefetch_load_ms"] += (time.perf_counter() - t0) * 1e3
                self.cond.notify_all()
            del mm, arrays, entry  # the views must not outlive their eviction (mm.close() refuses)

    def close(self):
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        with self.cond:
            for entry in list(self.entries.values()):
                self._drop(entry)


# ---------------------------------------------------------------------------------------------
# the model


class MoERuntime:
    """Greedy decoding of an offloaded MoE export with a KV cache.

        rt = MoERuntime("out/moe", policy="predictive", budget=0.25)
        ids, logits, times_ms, prefill_ms = rt.generate(prompt_ids, 256, keep_logits=True)
        rt.stats()   # hit rate, prefetch precision/recall, cache bytes (peak <= budget)
        rt.close()
    """

    def __init__(self, path, policy: str = "lru", budget: float | None = None, io: str = "read",
                 drop_evicted: bool = False, prefetch_k: int | None = None, alpha: float | None = None):
        if policy not in POLICIES:
            raise EdgesparseError(f"unknown cache policy {policy!r} (available: {', '.join(POLICIES)})")
        manifest, base = load_manifest(path)
        self.manifest, self.base, self.policy = manifest, base, policy
        cfg = manifest["config"]
        self.d, self.n_layers, self.n_heads = cfg["d_model"], cfg["n_layers"], cfg["n_heads"]
        self.head_dim = self.d // self.n_heads
        self.top_ks, self.eps, self.rope_base = cfg["top_k"], cfg["norm_eps"], cfg["rope_base"]
        t0 = time.perf_counter()
        self.w = self._load_backbone(manifest["backbone"])
        specs = manifest["experts"]
        for layer, experts in enumerate(specs):  # every blob present, right size, before any work
            for e, spec in enumerate(experts):
                _check_size(base / spec["file"], spec, f"expert blob (layer {layer}, expert {e})")
        total = manifest["expert_bytes_total"]
        budget = manifest.get("budget", 1.0) if budget is None else budget
        check_budget(budget)
        self.budget = float(budget)
        self.cache = ExpertCache(base, specs, self.budget, policy, io, drop_evicted)
        self.budget_bytes = self.cache.budget_bytes
        for layer, experts in enumerate(specs):
            largest = max(s["bytes"] for s in experts)
            if self.cache.quota[layer] < largest:
                floor = max(max(s["bytes"] for s in ex) / sum(s["bytes"] for s in ex) for ex in specs)
                raise EdgesparseError(f"expert budget {budget} leaves layer {layer} {self.cache.quota[layer]} B, "
                                      f"less than one of its experts ({largest} B)", hint=f"use a budget >= {floor:.4f}")
        self.all_resident = self.budget_bytes >= total
        if self.all_resident:
            self.cache.load_all()
        predictor = manifest.get("predictor", {})
        self.alpha = float(predictor.get("alpha", 0.5) if alpha is None else alpha)
        self.prefetch_k = prefetch_k
        self.affinity = [np.asarray(t, dtype=np.float32) for t in manifest.get("affinity", [])]
        if policy == "predictive" and len(self.affinity) != self.n_layers - 1 and self.alpha < 1:
            raise EdgesparseError("this export has no inter-layer affinity table; predictive needs one",
                                  hint="re-export with calibration text")
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.pred = dict(predicted=0, correct=0, actual=0)
        self.reset()

    def _load_backbone(self, spec: dict) -> dict:
        path = self.base / spec["file"]
        _check_size(path, spec, "backbone")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != spec["sha256"]:
            raise _corrupt(path, "backbone")
        return _views(data, _layout(spec["tensors"]))

    def reset(self, capacity: int = 256):
        """Forget the context (KV cache) but keep the expert cache and statistics."""
        self.pos = 0
        self.k_cache = np.zeros((self.n_layers, self.n_heads, capacity, self.head_dim), np.float32)
        self.v_cache = np.zeros_like(self.k_cache)

    def _grow(self):
        pad = np.zeros_like(self.k_cache)
        self.k_cache = np.concatenate([self.k_cache, pad], axis=2)
        self.v_cache = np.concatenate([self.v_cache, pad], axis=2)

    # -- prediction -----------------------------------------------------------------------------
    def _predict(self, layer: int, hidden, prev_experts, prev_weights):
        """(experts layer `layer` will likely use, best first; the probability of each of its
        experts): its router on the current hidden state, mixed with the affinity table rows of
        the previous layer's experts (none for layer 0)."""
        w = self.w
        h = layer_norm(hidden, w[f"blocks.{layer}.ln2.weight"], w[f"blocks.{layer}.ln2.bias"], self.eps)
        probs = softmax(self._router(layer, h))
        if prev_experts is not None and self.alpha < 1:
            table = self.affinity[layer - 1]
            affinity = sum(pw * table[e] for e, pw in zip(prev_experts, prev_weights))
            probs = self.alpha * probs + (1 - self.alpha) * affinity
        return [int(e) for e in top_k(probs, self.prefetch_k or self.top_ks[layer])], probs

    def _router(self, layer: int, h):
        logits = self.w[f"blocks.{layer}.router.weight"] @ h
        bias = self.w.get(f"blocks.{layer}.router.bias")
        return logits + bias if bias is not None else logits

    def _score(self, predicted, actual):
        hit = len(set(predicted) & set(actual))
        self.pred["predicted"] += len(predicted)
        self.pred["actual"] += len(actual)
        self.pred["correct"] += hit

    # -- one token ------------------------------------------------------------------------------
    def step(self, token: int):
        """Feed one token; the logits for the next one (float32 [vocab])."""
        w, d, specs = self.w, self.d, self.manifest["experts"]
        if self.pos >= self.k_cache.shape[2]:
            self._grow()
        x = w["tok_emb.weight"][token].astype(np.float32)
        cos, sin = rope_tables(self.head_dim, self.pos, self.rope_base)
        predictive = self.policy == "predictive" and not self.all_resident
        predicted = None
        if predictive:
            predicted, probs = self._predict(0, x, None, None)
            self.cache.prefetch(0, predicted, probs)
        for layer in range(self.n_layers):
            p = f"blocks.{layer}."
            h = layer_norm(x, w[p + "ln1.weight"], w[p + "ln1.bias"], self.eps)
            q = (w[p + "attn.q.weight"] @ h).reshape(self.n_heads, self.head_dim)
            k = (w[p + "attn.k.weight"] @ h).reshape(self.n_heads, self.head_dim)
            v = (w[p + "attn.v.weight"] @ h).reshape(self.n_heads, self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[layer, :, self.pos] = k
            self.v_cache[layer, :, self.pos] = v
            keys = self.k_cache[layer, :, :self.pos + 1]
            scores = (keys @ q[:, :, None])[:, :, 0] * np.float32(1 / math.sqrt(self.head_dim))
            att = (softmax(scores)[:, None, :] @ self.v_cache[layer, :, :self.pos + 1])[:, 0]
            x = x + w[p + "attn.o.weight"] @ att.reshape(d)

            h2 = layer_norm(x, w[p + "ln2.weight"], w[p + "ln2.bias"], self.eps)
            logits = self._router(layer, h2)
            chosen = [int(e) for e in top_k(logits, self.top_ks[layer])]
            gates = softmax(logits[chosen])
            if predicted is not None:
                self._score(predicted, chosen)
                predicted = None
            if predictive and layer + 1 < self.n_layers:
                predicted, probs = self._predict(layer + 1, x, chosen, gates)
                self.cache.prefetch(layer + 1, predicted, probs)
            # resident experts first (prefetches keep landing meanwhile), then the misses
            order = sorted(chosen, key=lambda e: not self.cache.resident((layer, e)))
            outs = {}
            for e in order:
                arrays = self.cache.acquire((layer, e))
                try:
                    outs[e] = expert_forward(arrays, specs[layer][e]["activation"], h2)
                finally:
                    del arrays
                    self.cache.release((layer, e))
            y = np.zeros(d, np.float32)
            for e in sorted(chosen):  # a fixed order: offloaded output == all-resident, bit for bit
                y += outs[e] * gates[chosen.index(e)]
            x = x + y
        self.pos += 1
        x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], self.eps)
        return w["tok_emb.weight"] @ x

    def generate(self, prompt: list[int], tokens: int, keep_logits: bool = False):
        """Greedy: (new ids, their logits [tokens, vocab] or None, ms per new token, prefill ms).
        The prompt's last token is fed by the first timed step."""
        if not prompt:
            raise EdgesparseError("the prompt is empty")
        if tokens < 1:
            raise EdgesparseError(f"tokens must be >= 1, got {tokens}")
        vocab = self.w["tok_emb.weight"].shape[0]
        if any(not 0 <= t < vocab for t in prompt):
            raise EdgesparseError(f"prompt token ids must be in [0, {vocab})")
        self.reset(len(prompt) + tokens)
        t0 = time.perf_counter()
        for token in prompt[:-1]:
            self.step(token)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        out, rows, times = [], [], []
        token = prompt[-1]
        for _ in range(tokens):
            t0 = time.perf_counter()
            logits = self.step(token)
            token = int(np.argmax(logits))
            times.append((time.perf_counter() - t0) * 1e3)
            out.append(token)
            if keep_logits:
                rows.append(logits)
        return out, (np.stack(rows) if keep_logits else None), times, prefill_ms

    def stats(self) -> dict:
        s = dict(self.cache.stats)
        requests = max(s["requests"], 1)
        would_miss = s["prefetch_hits"] + s["misses"]
        s.update(
            policy=self.policy, budget=self.budget, budget_bytes=self.budget_bytes,
            expert_bytes_total=self.manifest["expert_bytes_total"], cache_peak_bytes=self.cache.max_used_bytes,
            hit_rate=s["hits"] / requests, ready_hit_rate=s["ready_hits"] / requests,
            prefetch_precision=(s["prefetch_useful"] / s["prefetch_loads"]) if s["prefetch_loads"] else None,
            prefetch_recall=(s["prefetch_hits"] / would_miss) if self.policy == "predictive" and would_miss else None,
            predictor_precision=(self.pred["correct"] / self.pred["predicted"]) if self.pred["predicted"] else None,
            predictor_recall=(self.pred["correct"] / self.pred["actual"]) if self.pred["actual"] else None,
            all_resident=self.all_resident, load_ms=self.load_ms,
        )
        return s

    def close(self):
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# the command line (one JSON line, like the other runners)


def _status_mb(key: str) -> float | None:
    """A /proc/self/status size in MB (this file runs alone on boards, like device_bench.py, so it
    carries its own copy of this reader)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if key == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return None


def run(path, policy: str, budget: float | None, tokens: int, prompt: str, io: str = "read", drop_evicted: bool = False) -> dict:
    rss_before = _status_mb("VmRSS")
    with MoERuntime(path, policy=policy, budget=budget, io=io, drop_evicted=drop_evicted) as rt:
        rss_loaded = _status_mb("VmRSS")
        ids, _, times, prefill_ms = rt.generate(list(prompt.encode("utf-8")), tokens)
        result = rt.stats()
    result.update(
        tokens=tokens, prompt_tokens=len(prompt.encode("utf-8")), times_ms=times, prefill_ms=prefill_ms,
        tokens_per_s=len(times) / (sum(times) / 1e3), generated=bytes(ids).decode("utf-8", errors="replace"),
        generated_ids=ids, rss_before_load_mb=rss_before, rss_after_load_mb=rss_loaded,
        peak_rss_mb=_status_mb("VmHWM"), torch_imported="torch" in sys.modules, io=io, drop_evicted=drop_evicted,
    )
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Greedy decoding of an edgesparse MoE offload export (numpy only).")
    ap.add_argument("export", help="the export folder or its moe.json")
    ap.add_argument("--policy", default="lru", choices=POLICIES)
    ap.add_argument("--budget", type=float, default=None, help="fraction of expert bytes resident (default: the export's)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default=None, help="prompt text (default: the export's sample prompt)")
    ap.add_argument("--io", default="read", choices=IO_MODES, help="read: pread into a fixed arena (default); mmap: map each cached expert")
    ap.add_argument("--drop-evicted", action="store_true", help="drop evicted experts from the page cache too")
    ap.add_argument("--json", action="store_true", help="print one JSON line with timings and statistics")
    args = ap.parse_args(argv)
    try:
        prompt = args.prompt if args.prompt is not None else load_manifest(args.export)[0].get("sample_prompt", "\n")
        result = run(args.export, args.policy, args.budget, args.tokens, prompt, args.io, args.drop_evicted)
    except EdgesparseError as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(prompt + result["generated"])
        print(f"\n{result['tokens_per_s']:.1f} tokens/s, hit rate {result['hit_rate']:.1%}, "
              f"peak RSS {result['peak_rss_mb']:.1f} MB, cache peak {result['cache_peak_bytes'] / 2**20:.2f} MiB "
              f"of {result['budget_bytes'] / 2**20:.2f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
