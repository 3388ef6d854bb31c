"""Search spaces over mixtures: simplex parameterisations that map to Optuna and Ray Tune.

SimplexSpace is the plain simplex; ConstrainedSimplex adds per-coordinate bounds (repetition caps
via repetition_caps) and fixed coordinates; PolytopeSimplex adds linear rows A_ub @ a <= b_ub;
CollapsedSpace is the polytope over {old} + searched domains whose points stand for the mixture
a_old * p + a (expand), with repetition caps on that mixture as rows (cap_constraints). All share
one contract (see constrained.py).
"""
from search_spaces.collapsed import OLD, CollapsedSpace, cap_constraints, expand
from search_spaces.constrained import ConstrainedSimplex, capped_proportional, repetition_caps
from search_spaces.polytope import PolytopeSimplex
from search_spaces.simplex import SimplexSpace

__all__ = ["SimplexSpace", "ConstrainedSimplex", "CollapsedSpace", "PolytopeSimplex", "repetition_caps",
           "capped_proportional", "cap_constraints", "expand", "OLD"]
