"""The two Serve deployments: the ranker (model, multiplexed adapters, batching) and the ingress.

The ingress process imports this module too (to build its class), so torch, transformers and
peft are imported inside the ranker's methods only.
"""

import asyncio
import logging
import math
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from alro_ray.config import ModelConfig, from_dict
from alro_ray.data.prompts import Item, shown_text
from alro_ray.errors import NonFiniteError
from alro_ray.rank.ranker import FUSION_FITS, FUSION_HINTS, Ranker, build_ranker
from alro_ray.rank.fusion import fuse, fused_order
from alro_ray.serve.auth import ApiKey
from alro_ray.serve.contract import Fusion, RankFailure, RankJob, RankOutcome
from alro_ray.serve.http import make_fastapi_app
from alro_ray.serve.routes import nonfinite_scores
from alro_ray.serve.registry import AdapterEntry
from alro_ray.serve.schemas import safe_text
from alro_ray.serve.settings import ServeSettings

log = logging.getLogger("alro_ray")


class _AdapterRef:
    """What the multiplexed loader returns; Serve calls __del__ when it evicts the adapter (LRU).

    Eviction only marks the adapter: it is deleted from the shared model by the next load, under
    the model lock, so a batch that is running never loses its weights.
    """

    def __init__(self, owner: "RankerDeployment", name: str):
        self.owner, self.name, self._released = owner, name, False

    def __del__(self):
        if not self._released:
            self._released = True
            self.owner._evicted.add(self.name)


@serve.deployment(name="ranker")
class RankerDeployment:
    """One base model, several LoRA adapters on it (multiplexed by name), batched ranking."""

    def __init__(self, settings: ServeSettings, registry: dict[str, AdapterEntry]):
        import torch  # heavy: the ranker's process only

        from alro_ray.model.loading import load_base_model  # imports torch

        self.settings = settings
        self.registry = registry
        threads = settings.torch_threads
        if threads is None:  # the CPUs Ray gave this replica (YAML ray_actor_options or num_cpus=)
            try:
                threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            except Exception:
                threads = 1
        torch.set_num_threads(max(1, threads))
        use_cuda = bool(settings.num_gpus) and torch.cuda.is_available()
        self.device = "cuda" if use_cuda else "cpu"
        dtype = self.dtype = getattr(torch, settings.dtype)
        first = next(iter(registry.values()))
        model_cfg = from_dict(ModelConfig, first.model)
        self.base = load_base_model(model_cfg, dtype).to(self.device)
        self.peft = None
        self.loaded: list[str] = []
        self.rankers: dict[str, Ranker] = {}  # name -> a Ranker sharing self.peft
        self.broken: dict[str, str] = {}  # name -> why it cannot rank (NaN/inf weights); checked per load
        self._lock = threading.Lock()  # one forward at a time; guards set_adapter/load/delete
        self._evicted: set[str] = set()
        self._stats_lock = threading.Lock()
        self.batch_sizes: Counter = Counter()  # requests per @serve.batch call
        self.group_sizes: Counter = Counter()  # prompts per forward pass
        self.requests = 0
        self.adapter_loads = 0
        self.busy_s = 0.0  # time spent ranking batches (prompt rendering included)
        self.started = time.time()
        k = settings.max_adapters_per_replica

        async def load(name: str) -> _AdapterRef:  # multiplexed: LRU cache of adapters
            return await self._load_adapter(name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=k)(load)
        self.reconfigure({"max_batch_size": settings.max_batch_size,
                          "batch_wait_timeout_s": settings.batch_wait_timeout_s})
        with self._lock:  # the default adapter is ready before the replica reports healthy
            self._attach(settings.default_name)

    def reconfigure(self, config: dict) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s}; changes batching without restarting."""
        config = config or {}
        if "max_batch_size" in config:
            self.settings.max_batch_size = int(config["max_batch_size"])
            self._batched.set_max_batch_size(self.settings.max_batch_size)
        if "batch_wait_timeout_s" in config:
            self.settings.batch_wait_timeout_s = float(config["batch_wait_timeout_s"])
            self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    # -- adapters ------------------------------------------------------------------------------

    async def _load_adapter(self, name: str) -> _AdapterRef:
        if name not in self.registry:  # never a path: only names fixed at start
            raise KeyError(f"unknown adapter {name!r}")

        def attach():
            with self._lock:
                self._attach(name)

        await asyncio.to_thread(attach)
        return _AdapterRef(self, name)

    def _attach(self, name: str) -> None:
        """Load adapter `name` into the shared model (caller holds the lock). PEFT knows it by its
        internal name (`peft_name`): client names may hold what PEFT module names cannot."""
        from peft import PeftModel  # heavy: the ranker's process only

        entry = self.registry[name]
        self._evicted.discard(name)
        adapter_dir = str(Path(entry.path) / "adapter")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=entry.peft_name)
            self.adapter_loads += 1
        elif entry.peft_name not in self.peft.peft_config:
            self.peft.load_adapter(adapter_dir, adapter_name=entry.peft_name)
            self.adapter_loads += 1
        self.peft.to(self.device).eval()
        self._check_weights(name)
        for old in list(self._evicted):  # free adapters Serve's LRU let go of
            old_peft = self.registry[old].peft_name
            if old_peft in self.peft.peft_config and len(self.peft.peft_config) > 1:
                self.peft.delete_adapter(old_peft)
                self.rankers.pop(old, None)
            self._evicted.discard(old)
        if name not in self.rankers:  # its tokenizer, score head and hints on the shared model
            self.rankers[name] = build_ranker(self.peft, entry.path, self.device, self.dtype, f"adapter {name!r}")
        # a new list: stats() reads it without the lock
        self.loaded = sorted(n for n, e in self.registry.items() if e.peft_name in self.peft.peft_config)
        log.info("adapter %r ready (loaded: %s)", name, self.loaded)

    def _check_weights(self, name: str) -> None:
        """Mark adapter `name` broken when its LoRA tensors hold NaN/inf: kept loaded (it is small)
        but refused per request, so other adapters still answer."""
        import torch  # heavy: the ranker's process only

        mine = self.registry[name].peft_name  # its parameters are `...lora_X.<peft_name>...`
        bad = []
        for pname, p in self.peft.named_parameters():
            parts = pname.split(".")
            ours = any(a.startswith("lora_") and b == mine for a, b in zip(parts, parts[1:]))
            if ours and not bool(torch.isfinite(p).all()):
                bad.append(pname)
        if not bad:
            self.broken.pop(name, None)
            return
        self.broken[name] = (f"the adapter {name!r} is broken: {len(bad)} of its weight tensors hold NaN/inf "
                             f"(e.g. {bad[0]}), so its scores would be too; retrain it (or replace its "
                             f"checkpoint) and restart the app; other adapters still answer")
        log.error("%s", self.broken[name])

    # -- ranking -------------------------------------------------------------------------------

    async def rank(self, job: RankJob) -> RankOutcome | RankFailure:
        """Rank one request; a request that cannot be ranked gets a RankFailure (the rest of its
        batch still is ranked)."""
        if job.adapter not in self.registry:
            return RankFailure(404, f"unknown adapter {safe_text(job.adapter, 80)!r}")
        await self.get_adapter(job.adapter)
        if job.adapter in self.broken:
            return RankFailure(500, self.broken[job.adapter])
        return await self._batched(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[RankJob]) -> list[RankOutcome | RankFailure]:
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._run_batch, jobs)
        with self._stats_lock:
            self.busy_s += time.perf_counter() - t0
        return out

    def _run_batch(self, jobs: list[RankJob]) -> list[RankOutcome | RankFailure]:
        """Render every request, then rank each group of the same adapter, mode and candidate
        count in one forward pass."""
        n = len(jobs)
        with self._stats_lock:
            self.batch_sizes[n] += 1
            self.requests += n
        results: list[RankOutcome | RankFailure | None] = [None] * n
        groups: dict[tuple[str, str, int], list[tuple[int, _Prompt]]] = defaultdict(list)
        for i, job in enumerate(jobs):
            prompt = self._prepare(job)
            if isinstance(prompt, RankFailure):
                results[i] = prompt
            else:
                groups[(job.adapter, job.mode, len(job.candidates))].append((i, prompt))
        for (name, mode, c), members in groups.items():
            members.sort(key=lambda m: len(m[1].ids))  # less padding
            ranked = self._rank_group(name, mode, c, [prompt.ids for _, prompt in members])
            for (i, prompt), result in zip(members, ranked):
                results[i] = result if isinstance(result, RankFailure) else prompt.outcome(*result, batch_size=n)
        return results

    def _ranker_for(self, name: str) -> Ranker:
        ranker = self.rankers.get(name)
        if ranker is None:  # evicted between load and batch: load it again
            with self._lock:
                self._attach(name)
            ranker = self.rankers[name]
        return ranker

    def _prepare(self, job: RankJob) -> "_Prompt | RankFailure":
        """The request's prompt token ids (and classical scores, when it fuses), or why not."""
        try:
            ranker = self._ranker_for(job.adapter)
            refused = _refusal(job, ranker)
            if refused:
                return refused
            c = len(job.candidates)
            # Hints (a ranker trained with data.hints): the request's own values, else the saved fit's
            # by candidate id ("none" for unknown ids); MF's user part from history items with ids.
            hint_args = (job.candidate_ids, job.candidate_hints or [None] * c, job.history_ids, job.history_ratings)
            notes = ranker.hint_notes(*hint_args)
            history, candidates = job.history, job.candidates
            if not job.texts_as_trained:
                history = [(_as_trained(item, ranker), rating) for item, rating in history]
                candidates = [_as_trained(item, ranker) for item in candidates]
            ids = ranker.prompt_ids(history, candidates, notes)
            classical = None
            if job.fusion:
                values = ranker.classical_scores(job.fusion.classical, *hint_args)
                if all(v is None for v in values):
                    return RankFailure(422, no_classical_scores(job.fusion.classical))
                classical = unknown_as_mean(values)
        except Exception as e:  # a bug or a broken checkpoint: fail this request only
            log.exception("cannot prepare a request")
            return RankFailure(500, f"internal error preparing the request: {type(e).__name__}")
        if len(ids) > self.settings.max_prompt_tokens:
            return RankFailure(422, f"the rendered prompt has {len(ids)} tokens, limit "
                                    f"{self.settings.max_prompt_tokens}: shorten history or titles")
        return _Prompt(ids, job.fusion, classical)

    def _rank_group(self, name: str, mode: str, c: int, prompts: list[list[int]]
                    ) -> list[tuple[list[int], list[float]] | RankFailure]:
        """(order, scores) per prompt from one forward pass of adapter `name`; a failure fails the group."""
        try:
            with self._lock:
                if self.registry[name].peft_name not in self.peft.peft_config:
                    self._attach(name)
                if name in self.broken:  # reloaded in this batch and found broken
                    raise NonFiniteError(self.broken[name])
                self.peft.set_adapter(self.registry[name].peft_name)
                orders, scores = self.rankers[name].rank(prompts, mode, c)
            if not all(math.isfinite(s) for row in scores for s in row):  # in case a path did not raise
                raise NonFiniteError(nonfinite_scores(name))
        except NonFiniteError as e:  # a broken adapter or model: never an order from noise
            log.error("adapter %r: %s", name, e)
            return [RankFailure(500, self.broken.get(name) or nonfinite_scores(name))] * len(prompts)
        except Exception as e:  # fail this group only; the rest of the batch is answered
            log.exception("ranking a group of %d failed", len(prompts))
            return [RankFailure(500, f"internal error while ranking: {type(e).__name__}")] * len(prompts)
        with self._stats_lock:
            self.group_sizes[len(prompts)] += 1
        return list(zip(orders, scores))

    def stats(self) -> dict:
        import torch  # heavy: the ranker's process only

        with self._stats_lock:
            batch_sizes, group_sizes, requests = dict(self.batch_sizes), dict(self.group_sizes), self.requests
            busy_s = self.busy_s
        return {
            "requests": requests,
            "batches": sum(batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())},
            "forward_batch_sizes": {str(k): v for k, v in sorted(group_sizes.items())},
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
            "loaded_adapters": self.loaded,
            "broken_adapters": sorted(self.broken),
            "adapter_loads": self.adapter_loads,
            "busy_s": round(busy_s, 3),
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),  # which replica answered (bench/serve_load.py kill-ranker watches it change)
        }

    def ping(self) -> str:
        return "ok"


@dataclass(frozen=True)
class _Prompt:
    """A request ready to rank: its prompt token ids and, when it fuses, the classical scores."""

    ids: list[int]
    fusion: Fusion | None = None
    classical: list[float] | None = None

    def outcome(self, order: list[int], scores: list[float], batch_size: int) -> RankOutcome:
        if self.fusion is None or self.classical is None:
            return RankOutcome(order, scores, batch_size)
        f = self.fusion
        return RankOutcome(fused_order(scores, self.classical, f.weight, f.method),
                           fuse(scores, self.classical, f.weight, f.method).tolist(), batch_size, f)


def _as_trained(item: Item, ranker: Ranker) -> Item:
    """An item's text cut as the adapter's training data was (data.max_title_chars and
    data.max_attribute_chars of its config; the one function prepare uses)."""
    d, name = ranker.config.data, ranker.info.attribute_name
    return Item(shown_text(item.title, d.max_title_chars, name).text,
                shown_text(item.attributes, d.max_attribute_chars, name).text)


def _refusal(job: RankJob, ranker: Ranker) -> RankFailure | None:
    """What this adapter cannot rank: more candidates than it has letters, or `score` without a head."""
    c = len(job.candidates)
    if not 2 <= c <= ranker.candidates:
        return RankFailure(422, f"adapter {job.adapter!r} ranks 2 to {ranker.candidates} candidates, got {c}")
    if job.mode == "score" and ranker.scorer is None:
        return RankFailure(422, f"adapter {job.adapter!r} has no score head, so it cannot rank in mode 'score': "
                                f"choose another mode or an adapter trained with model.head.kind linear or mlp")
    return None


def no_classical_scores(classical: str) -> str:
    """The 422 for a fusion request where no candidate has the classical model's score."""
    return (f"fusion with {classical!r} needs its score for the candidates: pass candidates[].hints."
            f"{FUSION_HINTS[classical]}, or use an adapter trained with data.hints including "
            f"{' or '.join(FUSION_FITS[classical])} and send catalog ids it knows")


def unknown_as_mean(values: list[float | None]) -> list[float]:
    """Candidates without a classical score get the mean of the others' (neutral under z-scores)."""
    known = [float(v) for v in values if v is not None]
    return [sum(known) / len(known) if v is None else float(v) for v in values]


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    """HTTP front: validation, limits and error bodies; forwards to the ranker by adapter name.
    `api_key`: the digest of ALRO_SERVE_API_KEY where the app was built (auth.ApiKey), or None."""

    def __init__(self, ranker, settings: ServeSettings, registry: dict[str, AdapterEntry],
                 api_key: bytes | None = None):
        self.ranker = ranker
        self.settings = settings
        self.registry = registry
        self.api_key = ApiKey(api_key)

    def __serve_build_asgi_app__(self):
        return make_fastapi_app(self.settings, self.registry, self.ranker, self.api_key)
