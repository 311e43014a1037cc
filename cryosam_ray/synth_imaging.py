"""How a synthetic tomogram is imaged: a tilt series' missing wedge, a CTF-like band-pass and
white noise at a given SNR (see :mod:`cryosam_ray.synth` for the scene). Arrays are ZYX."""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

_WAVELENGTH_A = 0.0197  # electrons at 300 kV


def missing_wedge_mask(shape: tuple[int, int, int], tilt_range: float) -> np.ndarray:
    """Fourier coefficients a +-``tilt_range`` tilt series about y measures (beam along z).

    Each projection at tilt t fills the central plane that contains the ky axis and the
    direction (kz, kx) = (sin t, cos t). A coefficient is kept when the angle of (kz, kx) from
    the kx axis is within the tilt range, ``|kz| <= tan(tilt_range) * |kx|``; ky plays no part.
    The missing wedge around kz blurs the volume along z: particles look elongated in z.

    Returns:
        (D, H, W // 2 + 1) bool, in ``numpy.fft.rfftn`` layout for a (D, H, W) = ``shape`` volume.
    """
    kz, _, kx = (np.abs(k) for k in _frequencies(shape))
    theta = math.radians(tilt_range)
    # written with sin/cos so that tilt_range = 90 keeps everything; the DC term is always kept
    keep = kz * math.cos(theta) <= kx * math.sin(theta) + 1e-7
    return np.broadcast_to(keep, (*shape[:2], shape[2] // 2 + 1)).copy()


def _frequencies(shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kz, ky, kx in cycles per voxel, float32, broadcastable to the rfftn layout of ``shape``."""
    return (np.fft.fftfreq(shape[0]).astype(np.float32)[:, None, None],
            np.fft.fftfreq(shape[1]).astype(np.float32)[None, :, None],
            np.fft.rfftfreq(shape[2]).astype(np.float32)[None, None, :])


def ctf_bandpass(shape: tuple[int, int, int], voxel_size_a: float, *, defocus_um: float = 3.0,
                 amplitude_contrast: float = 0.07, ctf_weight: float = 0.5, highpass_a: float = 800.0,
                 bfactor: float = 1500.0) -> np.ndarray:
    """A CTF-like real filter: (1 - w + w * CTF(k)) * high-pass * B-factor envelope.

    CTF(k) = sqrt(1 - A^2) sin(chi) + A cos(chi), chi = pi * lambda * defocus * k^2 (300 kV,
    spherical aberration negligible at tomographic resolution), positive at low k so dense stays
    bright. ``ctf_weight`` w < 1 restores part of the low-frequency contrast the CTF removes, as
    the deconvolution filters applied to tomograms do, so particles stay visible at snr ~ 0.3.
    The Gaussian high-pass removes structure coarser than ``highpass_a`` (uneven ice).

    Returns:
        (D, H, W // 2 + 1) float32 in ``rfftn`` layout; k in 1/Angstrom from ``voxel_size_a``.
    """
    kz, ky, kx = _frequencies(shape)
    k2 = (kz * kz + ky * ky + kx * kx) / np.float32(voxel_size_a**2)
    chi = np.float32(math.pi * _WAVELENGTH_A * defocus_um * 1e4) * k2
    ctf = math.sqrt(1 - amplitude_contrast**2) * np.sin(chi) + amplitude_contrast * np.cos(chi)
    highpass = 1 - np.exp(-k2 * np.float32(highpass_a**2 / 2))
    envelope = np.exp(-k2 * np.float32(bfactor / 4))
    return ((1 - ctf_weight + ctf_weight * ctf) * highpass * envelope).astype(np.float32)


def image_like_a_tilt_series(signal: np.ndarray, *, snr: float, tilt_range: float, voxel_size_a: float,
                             polarity: str, rng: np.random.Generator) -> np.ndarray:
    """(D, H, W) float32 tomogram of a (D, H, W) density: missing wedge and band-pass in Fourier
    space, white noise at ``snr`` (signal / noise variance), ``polarity`` ("raw": dense is dark), offset."""
    spectrum = scipy.fft.rfftn(signal, workers=-1)
    spectrum *= missing_wedge_mask(signal.shape, tilt_range)
    spectrum *= ctf_bandpass(signal.shape, voxel_size_a)
    volume = scipy.fft.irfftn(spectrum, s=signal.shape, workers=-1).astype(np.float32, copy=False)
    signal_var = float(volume.var(dtype=np.float64))
    noise_sd = np.float32(math.sqrt(signal_var / snr))
    volume += rng.standard_normal(signal.shape, dtype=np.float32) * noise_sd
    if polarity == "raw":
        np.negative(volume, out=volume)
    # real reconstructions are not zero-mean; a picker must not rely on it
    volume += np.float32(rng.uniform(0.2, 1.0) * math.sqrt(signal_var * (1 + 1 / snr)))
    return volume
