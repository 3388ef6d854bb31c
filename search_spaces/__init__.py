"""Search spaces over mixtures: simplex parameterisations that map to Optuna and Ray Tune."""
from search_spaces.simplex import SimplexSpace

__all__ = ["SimplexSpace"]
