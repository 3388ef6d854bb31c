"""OpMixLoop: boundaries and pushes for a loop you wrote, on one process or on every rank of a
DDP job (a Ray Train train_loop_per_worker, torchrun).

    loop = OpMixLoop(opmix, sampler)                    # on every rank, the same seed
    for step in range(start, total):
        loop.before_step(step, model, lr=sched.get_last_lr()[0])   # rank 0 calls out at a boundary
        for micro in loop.rows():                       # this rank's rows of the global batch
            ...                                         # your forward, backward, step

Every rank draws the whole global batch from the same seeded sampler and keeps its own rows
(engine/ranks.py, the main run's rule), so the global draws follow the weights exactly as with
one process. At a boundary rank 0 makes the boundary call; the decision reaches every rank through
one broadcast (ranks.from_rank0) and every rank pushes it into its own sampler at the same step,
the first step none of whose rows is drawn yet (data/feed.py). In the background mode rank 0
polls the round at each step and broadcasts once it is in, so the switch is still one step for all.

state_dict() is what a checkpoint of yours must carry: the sampler's state and the rounds decided
or still running. It is the same on every rank; load it on every rank.
"""
from __future__ import annotations

from opmix_ray.engine.ranks import from_rank0, rank_rows
from opmix_ray.errors import TrainerSetupError
from opmix_ray.mixture import Mixture
from opmix_ray.own_trainer.client import FIELDS, BoundaryDecision


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class OpMixLoop:
    """rank/world: this process's place in the job (default: torch.distributed's, else 0 of 1).
    background: run rounds while training goes on (default: rounds.mode async). say: where the
    one line per round goes (rank 0 only; None: nowhere)."""

    def __init__(self, opmix, sampler, *, model=None, background: bool | None = None, rank: int | None = None,
                 world: int | None = None, say=print):
        opmix.check_sampler(sampler)
        if model is not None:
            opmix.check_model(model)
        self.opmix, self.sampler = opmix, sampler
        detected = _rank_world()
        self.rank = detected[0] if rank is None else rank
        self.world = detected[1] if world is None else world
        self.background = opmix.cfg.rounds.mode == "async" if background is None else bool(background)
        self.say = say if self.rank == 0 else None
        if sampler.rows_per_step is None:
            sampler.rows_per_step = opmix.batch_size
        self.decided: dict[int, dict] = {}  # round -> what it decided and the step it applied at
        self.pending: dict[int, object] = {}  # round -> its PendingRound on rank 0, None on the others
        self.requests: dict[int, dict] = {}  # round -> the request of a round still running (resume resends it)

    def rows(self, accum: int = 1) -> list:
        """This rank's `accum` micro-batches of the next global batch (opmix.batch_size rows)."""
        batch, _ = self.sampler.next_batch(self.opmix.batch_size)
        if self.opmix.batch_size % (self.world * accum):
            raise TrainerSetupError(f"{FIELDS}: batch_size {self.opmix.batch_size} does not split into {self.world} "
                                    f"ranks x {accum} micro-batches (fix: a multiple of {self.world * accum})")
        return rank_rows(batch, self.rank, self.world, accum)

    def before_step(self, step: int, model, lr: float | None = None) -> list[BoundaryDecision]:
        """Call on every rank with the optimizer steps done so far, before that step trains (a loader
        that draws ahead may have drawn its rows: the push then lands on the first step not drawn).
        Returns the decisions pushed now (with their record on rank 0)."""
        out = self._poll() if self.pending else []
        k = self.opmix.boundaries.index(step) if step in self.opmix.boundaries else None
        if k is None or k in self.decided or k in self.pending:
            return out
        if self.rank == 0:
            request = self.opmix.request(model, step, self.sampler, lr)
            pending = self.opmix.submit(request)
        else:
            request, pending = None, None
        if self.background:
            self.pending[k], self.requests[k] = pending, request
            if self.say:
                self.say(f"opmix-ray: round {k} started on the step-{step} checkpoint, in the background")
            return out
        got = pending.result() if pending is not None else None
        return out + [self._apply(got, from_rank0(self._wire(got), self.world))]

    def _poll(self) -> list[BoundaryDecision]:
        got = {k: p.result() for k, p in self.pending.items() if p is not None and p.ready()}
        wires = from_rank0({k: self._wire(d) for k, d in got.items()}, self.world)
        out = []
        for k in sorted(wires):
            out.append(self._apply(got.get(k), wires[k]))
            self.pending.pop(k, None)
            self.requests.pop(k, None)
        return out

    @staticmethod
    def _wire(d: BoundaryDecision | None) -> dict | None:
        """What every rank needs of a decision (the record stays on rank 0)."""
        if d is None:
            return None
        return {"round": d.round, "step": d.step, "moved": d.moved, "weights": d.mixture.as_dict(),
                "reason": d.reason, "reused": d.reused}

    def _apply(self, full: BoundaryDecision | None, wire: dict) -> BoundaryDecision:
        mixture = Mixture.from_dict(wire["weights"], self.sampler.domains)
        at = self.sampler.push(mixture, key=wire["round"]) if wire["moved"] else None  # a stay changes nothing
        self.decided[wire["round"]] = {**wire, "at_step": at}
        if self.rank == 0:
            if at is not None:
                self.opmix.note_applied(wire["round"], at)
            if self.say:
                again = " (recorded decision reused)" if wire["reused"] else ""
                what = f"training on {mixture} from step {at}" if at is not None else f"keeping {self.sampler.mixture}"
                self.say(f"opmix-ray: round {wire['round']} (step {wire['step']}){again}: {wire['reason']}; {what}")
        dec = full or BoundaryDecision.from_dict(wire)
        return dec

    def finish(self) -> list[BoundaryDecision]:
        """At the end of training: wait for rounds still running (rank 0), whose decisions are
        recorded in the run dir but never applied; returns them."""
        out = []
        for k, p in sorted(self.pending.items()):
            if p is not None:
                d = p.result()
                out.append(d)
                if self.say:
                    self.say(f"opmix-ray: round {k} finished after training ended ({d.reason}): recorded, not applied")
        self.pending.clear()
        self.requests.clear()
        return out

    # --- resume ---
    def state_dict(self, step: int | None = None) -> dict:
        """The sampler's state (as at the start of `step`, for a loader that draws ahead) and the rounds."""
        return {"sampler": self.sampler.state_dict(step), "decided": {str(k): v for k, v in self.decided.items()},
                "pending": {str(k): r for k, r in self.requests.items()}, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        """Continue from state_dict(): the sampler, the decisions taken (a push the sampler had not
        yet applied is queued again at its step), and rounds that were running (sent again: the
        runner returns the recorded decision when the round had finished)."""
        self.sampler.load_state_dict(state["sampler"])
        self.decided = {int(k): v for k, v in state["decided"].items()}
        for k, d in sorted(self.decided.items()):
            if d["at_step"] is not None and d["at_step"] >= self.sampler.next_step:
                self.sampler.push(Mixture.from_dict(d["weights"], self.sampler.domains), key=k, at_step=d["at_step"])
        self.pending, self.requests = {}, {}
        for k, request in sorted((int(k), r) for k, r in state["pending"].items()):
            self.requests[k] = request
            self.pending[k] = self.opmix.submit(request) if self.rank == 0 else None
