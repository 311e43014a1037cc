"""One tomogram's stages, each a module of plain functions over the dataclasses of
:mod:`cryosam_ray.particle`: ``prompts`` (prompt instances) -> ``query`` (query parts, class
queries) -> ``match`` (proposals) -> ``particles`` (find particles, calibrated cut) ->
``classes`` (one class per particle) -> ``outputs`` (picks, masks, preview).
:mod:`cryosam_ray.job` strings them together for the executors.
"""
