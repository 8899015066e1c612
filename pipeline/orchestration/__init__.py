"""Orchestration: what each DVC stage does, as plain functions of (params, paths, tracker). `config.py`
parses params.yaml; `runs.py` is the one path every run takes (seed, build, train through the engine,
track, checkpoint, record); `jobs.py` runs a stage's independent runs side by side (`parallel.py`) and
checks the checkpoints it will load; `teachers.py`, `distill.py` and `mst.py` are the stages themselves."""
