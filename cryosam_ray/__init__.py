from cryosam_ray.errors import CryoSamError  # noqa: F401

__version__ = "0.1.0"
