"""Results of a trained model: records, tables, plots, the Markdown/HTML report and TensorBoard
events.

Shared by simulation runs and by ``savlt evaluate`` / ``report`` on a deployed model, so it
never imports the simulator or the synthetic-data generator (import contract).
"""
