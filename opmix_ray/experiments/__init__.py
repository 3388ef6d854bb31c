"""Experiments built on the engine: `opmix-ray bench` (bench.py, report.py), `opmix-ray fidelity`
(fidelity.py), `opmix-ray continual` (continual.py, instruct.py), and the baselines they compare
OP-Mix against (baselines/)."""
