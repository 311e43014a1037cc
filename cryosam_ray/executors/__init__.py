"""Executors: thin schedules over :mod:`cryosam_ray.job`, side by side.

``in_process``: a plain loop in this process (``--address none``). ``on_ray``: actor pools and
tasks on a local Ray or a cluster. Neither imports the other; both plan with
:mod:`cryosam_ray.plan` and give the same picks, masks and records.
"""
