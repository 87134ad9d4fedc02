"""The score and prune stages of `amp run` (`Run` mixes them in): Taylor scores over the
calibration batches, checkpointed every amp.checkpoint_every batches, and the search over
the validation batches, checkpointed at every decided block; a killed run resumes from
either, and a completed stage whose inputs are unchanged is kept."""

from __future__ import annotations

import json
import time

import torch
from safetensors.torch import save
from torch import nn

from ..config import SearchConfig
from ..core.adapter import vision_tower
from ..core.convergence import ScoreConvergence
from ..core.importance import AMPImportance, ScoreState
from ..core.serialization import read_manifest, save_pruned
from ..search.greedy import SearchState
from ..search.pruner import AMPPruner
from ..utils import dist as ddp
from ..utils.finite import NonFiniteError, check_inputs, locate
from ..utils.io import atomic_write, content_fingerprint, fingerprint, read_json, write_json
from ..utils.tensors import resolve_dtype, split_batch
from .outputs import (
    StageOutputError,
    check_neuron_values,
    check_prune_result,
    check_search_state,
    mlp_widths,
    read_tensors,
)
from .report import trace_summary

_CONVERGE = "convergence/"  # score checkpoint keys of the convergence checks


class SearchStages:
    """`Run`'s score and prune stages; they read the run's recipe, directory, original model
    and loaders (`Run`)."""

    def _locate(self, stage: str, model: nn.Module, batches: list, what: str):
        model = self._working_copy(model)
        tower, adapter = vision_tower(model)
        return locate(stage, tower, batches, what,
                      lambda b: adapter.features(tower, split_batch(b)[0]))

    def importance(self) -> AMPImportance:
        a = self.recipe.amp
        return AMPImportance(a.inv_temperature, a.criterion, use_abs=a.use_abs,
                             show_progress=self.show_progress)

    def _score_fp(self) -> str:
        r = self.recipe
        captions = (content_fingerprint(r.data.captions, self._hashes()) if r.data.captions
                    else None)
        # convergence only enters the fingerprint when on: runs without it keep theirs
        converge = (() if r.amp.score_convergence is None else
                    (r.amp.score_convergence, r.amp.max_steps, r.amp.round_to))
        return fingerprint(self.original_source(), self.original_fingerprint(), r.model,
                           r.data, captions, r.amp.criterion, r.amp.inv_temperature,
                           r.amp.use_abs, r.amp.dtype, r.seed, *converge)

    def _convergence(self) -> ScoreConvergence | None:
        a = self.recipe.amp
        c = a.score_convergence
        return (None if c is None else
                ScoreConvergence(c.every, c.patience, c.tolerance, a.max_steps, a.round_to))

    def stage_score(self) -> dict[str, torch.Tensor]:
        fp = self._score_fp()
        kept = self._kept_scores(fp, redo=True)
        if kept is not None:
            self.log("score: kept from an earlier run")
            self.reused.add("score")
            return kept
        checkpointing = self.recipe.amp.grad_checkpointing  # a switch on the model: a copy
        model = self._working_copy(self.original(), mutable=checkpointing)
        if checkpointing:
            tower, adapter = vision_tower(model)
            adapter.set_grad_checkpointing(tower, True)
        check_inputs("score", model, [], "calibration")  # weights; batches when they go wrong
        imp = self.importance()
        resume = self._score_resume(fp)
        converge = self._convergence()
        t0 = time.perf_counter()
        scores = imp.accumulate(
            model, self.loader("calibration", resume.batches if resume else 0), resume=resume,
            checkpoint=lambda state: self._score_checkpoint(fp, state),
            every=self.recipe.amp.checkpoint_every, converge=converge)
        self.seconds["score"] = time.perf_counter() - t0
        if not all(bool(torch.isfinite(v).all()) for v in scores.values()):
            raise self._locate("score", model, self.loader("calibration"), "calibration")
        if ddp.is_main():
            atomic_write(self.dir.scores, save({k: v.contiguous() for k, v in scores.items()}))
            write_json(self.dir.scores_meta, {
                "fingerprint": fp,
                "output_sha256": content_fingerprint(self.dir.scores, self._hashes()),
                "batches": imp.num_batches, "seconds": self.seconds["score"],
                "data": self.data_used["calibration"],
                **({} if converge is None else {"convergence": converge.record(
                    imp.num_batches)})})
        ddp.barrier()  # other ranks look for the scores file only once it is written
        self.dir.score_progress(ddp.rank()).unlink(missing_ok=True)
        stopped = "" if converge is None or converge.stopped is None else (
            f" (converged: the search's candidates unchanged for {converge.patience} checks "
            f"{converge.every} batches apart)")
        self.log(f"score: {len(scores)} MLPs over {imp.num_batches} calibration batches"
                 f"{stopped}")
        return scores

    def _kept_scores(self, fp: str, redo: bool) -> dict[str, torch.Tensor] | None:
        """The scores of a completed score stage for these inputs, checked against the
        model's MLPs; None when there are none, or (`redo`) when the file fails the check
        (logged: the stage computes them again)."""
        if not self._done("score", fp, self.dir.scores):
            return None
        try:
            tensors, _ = read_tensors(self.dir.scores)
            return check_neuron_values(self.dir.scores, tensors, mlp_widths(self.original()))
        except StageOutputError as e:
            if not redo:
                raise StageOutputError(f"{e}: run the score stage again") from None
            self.log(f"score: {e}; computing the scores again")
            return None

    def _score_checkpoint(self, fp: str, state: ScoreState) -> None:
        """This rank's partial sums, position and sampler (rank, world size), atomically."""
        meta = {"fingerprint": fp, "batches": str(state.batches), "rank": str(ddp.rank()),
                "world_size": str(ddp.world_size())}
        tensors = {k: v.contiguous() for k, v in state.sums.items()}
        if state.converge is not None:
            checks, values = state.converge.state()
            tensors.update({_CONVERGE + k: v.contiguous() for k, v in checks.items()})
            meta["convergence"] = json.dumps(values)
        atomic_write(self.dir.score_progress(ddp.rank()), save(tensors, metadata=meta))

    def _score_resume(self, fp: str) -> ScoreState | None:
        """The partial sums of a killed score stage, when every rank has them for the same
        inputs, sampler and position; else None (start over)."""
        path, state = self.dir.score_progress(ddp.rank()), None
        if path.is_file():
            try:
                tensors, meta = read_tensors(path)
                checks = meta.pop("convergence", None)
                if meta == {"fingerprint": fp, "batches": meta.get("batches"),
                            "rank": str(ddp.rank()), "world_size": str(ddp.world_size())}:
                    if not str(meta["batches"]).isdigit():
                        raise StageOutputError(f"{path}: batches {meta['batches']!r} is not a "
                                               "count of batches")
                    sums = {k: v for k, v in tensors.items() if not k.startswith(_CONVERGE)}
                    state = ScoreState(check_neuron_values(path, sums,
                                                           mlp_widths(self.original())),
                                       int(meta["batches"]),
                                       self._resumed_checks(path, tensors, checks))
            except StageOutputError as e:
                self.log(f"score: {e}; starting the score stage over")
        position = float(state.batches if state else -1)
        same = ddp.agree(position) ** 2 == ddp.agree(position * position)  # no spread
        if not same or position < 0:
            return None  # some rank has none, or another position: all start over
        self.log(f"score: resumed after {state.batches} calibration batches")
        return state

    def _resumed_checks(self, path, tensors: dict, checks: str | None
                        ) -> ScoreConvergence | None:
        """The convergence checks a score checkpoint holds (None without)."""
        converge = self._convergence()
        if converge is None or checks is None:
            return None
        try:
            values = json.loads(checks)
            converge.restore({k[len(_CONVERGE):]: v for k, v in tensors.items()
                              if k.startswith(_CONVERGE)}, values)
        except (ValueError, TypeError, AttributeError) as e:
            raise StageOutputError(f"{path}: unreadable convergence checks ({e})") from None
        return converge

    def stage_prune(self) -> dict:
        r = self.recipe
        # the cache settings change where states are kept, never the result; default search
        # settings leave the fingerprint of runs made before they existed as it was
        exclude: dict = {"cache": True, "score_convergence": True}
        if r.amp.search == SearchConfig():
            exclude["search"] = True
        elif r.amp.search.exact_reference:
            exclude["search"] = {"exact_reference"}
        fp = fingerprint(self._score_fp(), r.amp.model_dump(exclude=exclude))
        done = self._kept_prune(fp)
        if done is not None:
            self.log("prune: kept from an earlier run")
            self.reused.add("prune")
            return done["result"]
        scores = self._kept_scores(self._score_fp(), redo=False)
        if scores is None:
            raise FileNotFoundError(f"{self.dir.scores} is missing or was computed for other "
                                    "inputs: run the score stage first")
        search_dtype = resolve_dtype(r.amp.search_dtype or r.amp.dtype)
        model = self._working_copy(self.original(), mutable=True, dtype=search_dtype)
        check_inputs("prune", model, [], "validation")
        val = self.loader("validation", dtype=search_dtype)
        imp = self.importance().load_scores(scores, model)
        try:
            resume = check_search_state(self.dir.prune_progress,
                                        read_json(self.dir.prune_progress), fp,
                                        mlp_widths(self.original()))
        except (StageOutputError, ValueError) as e:  # damaged: not the killed run's state
            self.log(f"prune: {e}; starting the search over")
            resume = None

        def on_decided(state: SearchState) -> None:
            if ddp.is_main():
                write_json(self.dir.prune_progress, {"fingerprint": fp,
                                                     "state": state.to_dict()})

        c = r.amp.cache
        # budget mode and global allocation decide every size at the end: nothing to resume
        one_shot = r.amp.target is not None or r.amp.search.allocation == "global"
        example = split_batch(next(iter(val)))[0][:1]
        pruner = AMPPruner(
            model, example, imp, val, r.amp.threshold, r.amp.max_steps,
            r.amp.round_to, cache_device_bytes=int(c.device_gib * 2**30),
            cache_host_bytes=int(c.host_gib * 2**30), cache_dir=c.dir,
            cache_disk_bytes=None if c.disk_gib is None else int(c.disk_gib * 2**30),
            show_progress=self.show_progress, log=self.log,
            resume=None if one_shot else resume, on_decided=None if one_shot else on_decided,
            search_head=r.amp.search_head, target=r.amp.target.spec() if r.amp.target else None,
            measure=r.amp.search.measure, allocation=r.amp.search.allocation_spec(),
            confidence=r.amp.search.confidence,
            exact_reference=r.amp.search.exact_reference)
        try:
            result = pruner.step().to_dict()
        except NonFiniteError as e:
            # the search's error names the MLP; the original model shows where it began
            raise self._locate("prune", self.original(), val, "validation") from e
        self.seconds["prune"] = result["seconds"]
        model = model.float()
        if ddp.is_main():
            save_pruned(model, self.dir.pruned,
                        meta={"threshold": result["threshold"], "source": self.original_source()})
            write_json(self.dir.prune_meta, {
                "fingerprint": fp,
                "output_sha256": content_fingerprint(self.dir.pruned, self._hashes()),
                "result": result, "data": self.data_used["validation"]})
            self.dir.prune_progress.unlink(missing_ok=True)
        ddp.barrier()
        self._models["pruned"] = model
        b, a = result["mlp_params"]["before"], result["mlp_params"]["after"]
        search = {"measure": r.amp.search.measure}
        self.log(f"prune: MLP parameters {b:,} -> {a:,} ({100 * (1 - a / b):.1f}% removed), "
                 f"{trace_summary({**result, **result['extra'], 'search': search})}, "
                 f"cache: {result['cache']}")
        alloc = result["extra"].get("allocation")
        if alloc is not None:
            self.log(f"prune: global allocation by {alloc['measure']}: predicted "
                     f"{alloc['predicted']:.4g}, verified {alloc['verified']:.4g}, "
                     f"{alloc['curve_points']} curve points"
                     + (f"; {alloc['message']}" if alloc["message"] else ""))
        return result

    def _kept_prune(self, fp: str) -> dict | None:
        """prune.json of a completed prune stage for these inputs whose result is the
        pruned model's (sizes within the original widths and equal to the saved model's);
        else None (logged when the file fails the check: the search runs again)."""
        done = self._done("prune", fp, self.dir.pruned)
        if done is None:
            return None
        try:
            result = check_prune_result(self.dir.prune_meta, done.get("result"),
                                        mlp_widths(self.original()))
            saved = read_manifest(self.dir.pruned).get("hidden_sizes")
            if result["hidden_sizes"] != saved:
                raise StageOutputError(
                    f"{self.dir.prune_meta}: result.hidden_sizes {result['hidden_sizes']} are "
                    f"not the pruned model's {saved}")
        except StageOutputError as e:
            self.log(f"prune: {e}; searching again")
            return None
        return done
