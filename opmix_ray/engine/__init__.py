"""The engine: one OP-Mix run, round by round. Each step of a round has its own module:

    preflight.py     every input checked before anything is written or Ray starts
    main_run.py      the main run (one Ray Train job for the whole run), checkpoint at each boundary
    budget.py        search.budget_fraction: a round's search sized to a share of its segment
    adapters.py      one LoRA adapter per domain (and 'old') on the live checkpoint
    merge.py         the exact weight-space merge  W0 + c * sum_i a_i * delta_i
    candidates.py    a round's candidates: the stacked deltas, the caps polytope, the delta scale
    search.py        the Ray Tune search over them: searcher, trials, retries, progress
    scoring.py       what a trial process runs: the merged model built once, candidates scored
    trial_batch.py   several candidates per trial; scorer processes kept across rounds
    rerun.py         candidates whose trial process died, scored again after the search
    decision.py      what the round pushes: the leader (trials or the mixing law) vs stay, paired
                     standard error plus adapter noise, the Decision record
    rule.py          the safe rule's arithmetic (numpy only): the stay reference, the noise terms
    confirm.py       a move confirmed by an adapter trained on the leader's mixture
    controller.py    the MixtureController actor: pushes the decision into the main run
    domains.py       domain-set changes queued on a live run, applied at a boundary
    resume.py        continue a run whose driver died;  faults.py  what a lost node does
    continuation.py  the exact continuation of the main run from a round checkpoint
    driver.py        sequences the rounds: run, drive, finish

`run` loads lazily, so importing one step does not start the rest.
"""
__all__ = ["run"]


def __getattr__(name: str):
    if name == "run":
        from opmix_ray.engine.driver import run
        return run
    raise AttributeError(f"module 'opmix_ray.engine' has no attribute {name!r}")
