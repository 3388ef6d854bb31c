"""Search spaces over mixtures: simplex parameterisations that map to Optuna and Ray Tune.

SimplexSpace is the plain simplex; ConstrainedSimplex adds per-coordinate bounds (repetition caps
via repetition_caps) and fixed coordinates; CollapsedSpace searches {old mixture} + affected
domains and expands back; PolytopeSimplex adds linear rows A_ub @ a <= b_ub (caps on the mixture
a_old * p + a, via cap_constraints). All share one contract (see constrained.py).
"""
from search_spaces.constrained import CollapsedSpace, ConstrainedSimplex, capped_proportional, repetition_caps
from search_spaces.polytope import PolytopeSimplex, cap_constraints
from search_spaces.simplex import SimplexSpace

__all__ = ["SimplexSpace", "ConstrainedSimplex", "CollapsedSpace", "PolytopeSimplex", "repetition_caps",
           "capped_proportional", "cap_constraints"]
