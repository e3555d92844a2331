"""Tools of the ``lit-attrib`` command: sweeps that run several passes (fits, evaluations, captures).

Each tool is one function whose arguments ``jsonargparse`` turns into a subcommand
(``lit-attrib noise-robustness -c configs/noise_robustness_quick.yaml``); modules here are imported
only when their subcommand runs, so ``lit-attrib fit`` does not pay for them.
"""

__all__: list[str] = []
