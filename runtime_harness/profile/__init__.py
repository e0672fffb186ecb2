"""`ple-export profile`: how fast a bundle runs, where its memory lives, what the PLE table costs in
flash, and whether it fits a phone's budget.

    options.py   the flags that shape a measurement
    worker.py    the measured child: the one decode loop with a probe on every call
    run.py       fresh child processes per mode -> ProfileReport
    analysis.py  timings, PLE traffic, cold and enforced runs, the one verdict
    report.py    the report as typed values, and its JSON
    render.py, plot.py                a table, a picture
    baseline.py, versus.py            the regression gates: against a saved report, or against a
                                      base bundle profiled in turn on the same machine
"""

from runtime_harness.profile.baseline import compare_baseline, load_headline
from runtime_harness.profile.options import ProfileOptions
from runtime_harness.profile.plot import check_plot_path, plot
from runtime_harness.profile.render import render_table
from runtime_harness.profile.report import ProfileReport
from runtime_harness.profile.run import run_profile
from runtime_harness.profile.versus import Gate, Versus, profile_gated, versus

__all__ = [
    "ProfileOptions",
    "ProfileReport",
    "check_plot_path",
    "compare_baseline",
    "load_headline",
    "plot",
    "render_table",
    "run_profile",
    "Gate",
    "Versus",
    "profile_gated",
    "versus",
]
