"""Feature extraction: each paper dataset's raw files, as its publishers distribute them, turned into the
files the authors' loaders read (their preprocessed layout), by the `extract@<dataset>` stage.

`settings.py` holds the `extraction` params block and which module extracts which dataset;
`<module>.py` (ravdess, vggsound, crisismmd) each define `extract`, `RAW_LAYOUT` and `WEIGHTS`;
`common.py` what they share (weights found locally, progress bars, the resume cache, atomic outputs).
"""
