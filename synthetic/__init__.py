"""The synthetic multi-centre OCT data generator (``savlt synth``).

The clinical images cannot leave their hospitals, yet every stage of the pipeline needs data
with the real layout, file formats, class structures and centre shift. Used by simulation,
tests and benchmarks only: no deployed hospital or server imports it.
"""
