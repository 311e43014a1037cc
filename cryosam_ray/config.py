"""Typed job configuration: a pydantic model loaded from YAML, overridable by flags, validated once.

Each stage takes only its own section (``cfg.synth``, ``cfg.evaluate`` ...). Unknown keys are
errors, so a typo in a YAML file is caught before any work starts.

Overrides use dotted keys: ``{"synth.snr": 0.5}`` or, on the command line, ``--set synth.snr=0.5``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cryosam_ray.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IOConfig(_Section):
    """How tomograms are read and outputs written."""

    voxel_size_a: float | None = Field(
        None, gt=0, description="Voxel size in Angstrom used instead of the file headers' (None: from headers).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for remote URLs (s3://): key, secret, endpoint_url ...; "
        "by default credentials and endpoint come from the standard AWS environment.")
    mask_format: Literal["mrc", "ome-zarr"] = Field(
        "mrc", description="Instance and semantic masks as MRC, or as OME-Zarr multiscale label images (OME-NGFF "
        "0.4: napari-ome-zarr and neuroglancer open them; written chunk by chunk).")
    star_version: Literal[4, 5] = Field(
        5, description="picks.star for RELION 5 (rlnTomoName, rlnCenteredCoordinate*Angst from the tomogram's "
        "centre) or RELION 4 (rlnCoordinate* in voxels); both state the pixel size in data_optics.")
    cache_dir: str | None = Field(
        "auto", description="Where workers keep a local copy of each remote MRC tomogram they read (one download "
        "instead of ranged reads per slab along every axis) and a decompressed copy of each zarr tomogram (zarr "
        "decodes a whole chunk for every slice through it); auto: <temp dir>/cryosam-tomograms; null: no copy.")
    lease_ttl_s: float = Field(
        120.0, ge=5, description="Seconds a run's lease on its output folder lasts unless renewed (renewed every "
        "third of it while the run lives; a killed run's lease expires after this).")


class CopickSection(_Section):
    """A copick project as the run's source and destination (``cryosam run --copick``)."""

    config: str | None = Field(None, description="The copick project's config JSON (None: no copick project).")
    voxel_spacing: float | None = Field(None, gt=0, description="The voxel spacing (Angstrom) whose tomograms are "
                                        "read and at which segmentations are written.")
    tomo_type: str = Field("wbp", min_length=1, description="The tomogram type to read (wbp, denoised ...).")
    runs: tuple[str, ...] | None = Field(None, description="Runs to process (None: every run holding the tomogram).")
    user: str = Field("cryosam", min_length=1, description="copick user id of the picks and segmentations written.")
    session: str | None = Field(None, description="copick session id of what is written (None: the run's date, "
                                "YYYYMMDD, set when the run starts).")


class SynthConfig(_Section):
    """Synthetic tomograms (``cryosam synth``): see :class:`cryosam_ray.synth.SynthSettings`."""

    n: int = Field(2, ge=1, description="Number of tomograms.")
    seed: int = Field(0, description="Random seed; the same seed gives identical files.")
    prompts_per_class: int = Field(1, ge=1, description="Rows per class in prompts.csv: the first N particles "
                                   "of each class in the dataset.")
    shape: tuple[int, int, int] = Field((96, 192, 192), description="D H W in voxels (ZYX).")
    voxel_size_a: float = Field(10.0, gt=0, description="Voxel size in Angstrom.")
    classes: tuple[str, ...] = Field(("ribosome", "atpase", "hsp60"), min_length=1,
                                     description="Particle classes to place, distinct: ribosome, atpase, hsp60, "
                                     "ball (sphere 90 A across), rod (filament 70 A across, 320 A long).")
    particles_per_class: int = Field(12, ge=0, description="Particles attempted per class and tomogram.")
    crowding: float = Field(0.0, ge=0, le=1, description="Fraction of particles placed touching an earlier one "
                            "(label masks 1 voxel apart, never overlapping); 0: all packed with a free margin.")
    membranes: int = Field(1, ge=0, description="Curved lipid bilayers per tomogram.")
    gold_beads: int = Field(3, ge=0, description="Very dense fiducial-like beads per tomogram.")
    snr: float = Field(0.3, gt=0, description="Signal variance over noise variance.")
    tilt_range: float = Field(60.0, gt=0, le=90, description="Tilt range +-degrees (missing wedge about y).")
    polarity: Literal["raw", "inverted"] = Field("raw", description="raw: dense is dark; inverted: dense is bright.")
    use_real_maps: bool = Field(True, description="Render classes from ../shared/data maps when present.")
    data_dir: str | None = Field(None, description="Folder of real density maps (default: auto-detect).")

    @field_validator("shape")
    @classmethod
    def _shape_big_enough(cls, shape):
        if min(shape) < 16:
            raise ValueError(f"every side must be >= 16 voxels, got {shape}")
        return shape

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, classes):
        from cryosam_ray.synth_shapes import CLASSES  # here: loading a config needs no scipy otherwise

        unknown = [c for c in classes if c not in CLASSES]
        if unknown:
            raise ValueError(f"unknown class {unknown[0]!r}; expected distinct names from {', '.join(CLASSES)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct names from {', '.join(CLASSES)}")
        return classes


class EvaluateConfig(_Section):
    """Particle-picking evaluation (``cryosam evaluate``)."""

    radius_fraction: float = Field(0.5, gt=0, description="Match distance as a fraction of the class radius.")
    distance_vox: float | None = Field(None, gt=0, description="Fixed match distance in voxels (overrides).")
    distance_a: float | None = Field(None, gt=0, description="Fixed match distance in Angstrom (overrides).")
    beta: float = Field(4.0, gt=0, description="beta of the F-beta score (4 as in the CZII cryo-ET benchmark).")


class ClassicalSegmenterConfig(_Section):
    """The weight-free segmenter (see :class:`cryosam_ray.segmenters.classical.ClassicalSegmenter`)."""

    sigma: float = Field(1.5, ge=0, description="Gaussian smoothing in pixels before thresholding.")
    window: int = Field(48, ge=4, description="Half-size in pixels of the window around a seed prompt.")
    window_margin: int = Field(12, ge=1, description="Pixels around the previous mask on propagation steps.")
    threshold_fraction: float = Field(0.5, gt=0, lt=1, description="Cut between background (0) and particle (1).")
    min_contrast: float = Field(0.8, ge=0, description="Minimal particle contrast (noise units) at a seed.")
    min_area: int = Field(6, ge=0, description="Smallest accepted slice mask, pixels.")
    max_area_fraction: float = Field(0.6, gt=0, le=1, description="Largest mask as a fraction of the window.")
    min_pred_iou: float = Field(0.5, description="Smallest accepted stability score.")
    polarity: Literal["auto", "dark", "bright"] = Field("auto", description="Particle contrast; auto per prompt.")


_PRECISION_DOC = ("auto: the fastest numerically safe choice, bf16 on a GPU with native bfloat16 (compute "
                  "capability 8.0+), else fp32; fp32; bf16: float32 weights under bfloat16 autocast; fp16: float16 "
                  "weights (half the memory; float16 overflows past 6.5e4, see the README).")


class SamArchitectureConfig(_Section):
    """A custom SAM image encoder (``model_type: custom``): a smaller or distilled ViT."""

    encoder_embed_dim: int = Field(..., ge=1, description="Token width.")
    encoder_depth: int = Field(..., ge=1, description="Transformer blocks.")
    encoder_num_heads: int = Field(..., ge=1, description="Attention heads per block.")
    encoder_global_attn_indexes: list[int] = Field(..., description="Blocks with global (not windowed) attention.")


class SamSegmenterConfig(_Section):
    """SAM through segment-anything (see :class:`cryosam_ray.segmenters.sam.SamSegmenter`)."""

    model_type: Literal["vit_h", "vit_l", "vit_b", "custom"] = Field(
        "vit_h", description="Registry architecture, or custom with segmenter.sam.architecture.")
    architecture: SamArchitectureConfig | None = Field(
        None, description="With model_type custom: the image encoder's sizes (its checkpoint must match).")
    checkpoint: str | None = Field(None, description="Local path, s3:// or http(s):// URL of the checkpoint.")
    device: str | None = Field(None, description="cuda, cuda:N or cpu (None: cuda when available).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Image-encoder precision. " + _PRECISION_DOC + " fp16 keeps LayerNorm2d in float32 "
        "(stock SAM ViT-H overflows there in fp16: segment-anything issues 540, 696); prompt encoder and mask "
        "decoder always run in float32.")
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Image-encoder attention: sdpa (torch's scaled-dot-product attention, relative "
        "positions as its additive mask) or eager (segment-anything's own softmax(QK^T + bias)V).")
    compile: bool = Field(False, description="Wrap the image encoder in torch.compile (slow first batch).")
    batch_size: int = Field(8, ge=1, description="Slices per image-encoder batch (GPU memory grows with it).")
    decode_batch: int = Field(64, ge=1, description="Prompts per mask-decoder call (propagation fronts of a step).")
    cache_slices: int = Field(256, ge=1, description="Slice embeddings kept on the device (LRU; 2 MiB each): "
                              "bounds GPU memory; slices evicted and visited again are encoded again.")
    embedding_store: str | None = Field(None, description="zarr URL caching image embeddings (None: memory).")
    cache_dir: str | None = Field(None, description="Where downloaded checkpoints are kept.")
    min_area: int = Field(16, ge=0, description="Smallest accepted mask, pixels.")
    max_area: int | None = Field(None, ge=1, description="Largest accepted mask, pixels (None: no cap).")
    min_pred_iou: float = Field(0.0, description="Candidates need a predicted IoU above this.")
    mask_input: Literal["logits", "binary"] = Field("logits", description="Previous mask fed as logits or 0/1.")
    multimask: bool = Field(True, description="Ask SAM for three candidates per prompt.")
    window_margin: int = Field(16, ge=0, description="Pixels kept around each mask's bounding box.")


    @model_validator(mode="after")
    def _custom_needs_architecture(self):
        if (self.model_type == "custom") != (self.architecture is not None):
            raise ValueError("segmenter.sam.architecture goes with model_type: custom (and only with it)")
        return self

class SegmenterConfig(_Section):
    """The promptable 2D segmenter, picked by name."""

    backend: Literal["classical", "sam"] = Field("classical", description="classical (weight-free) or sam.")
    classical: ClassicalSegmenterConfig = Field(default_factory=ClassicalSegmenterConfig)
    sam: SamSegmenterConfig = Field(default_factory=SamSegmenterConfig)


class PropagationConfig(_Section):
    """Cross-Plane Self-Prompting (see :func:`cryosam_ray.propagation.propagate`)."""

    directions: Literal["six", "z"] = Field("six", description="six: +-z,+-y,+-x (paper); z: +-z (public code).")
    iou_threshold: float = Field(0.5, ge=0, le=1, description="tau_IoU: stop when consecutive masks' IoU is lower.")
    max_steps: int | None = Field(None, ge=1, description="Slices per front beyond its seed (None: no limit).")
    size_prior: bool = Field(False, description="Tell the segmenter the prompt instances' radius when propagating "
                             "proposals (windows, area caps, front length); false: the paper's plain propagation.")


class FilterBankConfig(_Section):
    """The weight-free encoder (see :class:`cryosam_ray.encoders.filterbank.FilterBankEncoder`)."""

    sigmas: tuple[float, ...] = Field((1.0, 2.0, 4.0, 8.0), min_length=1, description="Gaussian scales, pixels.")
    stride: int = Field(4, ge=1, description="Pixels per token along each slice axis.")


class RingsConfig(_Section):
    """The weight-free ring-profile encoder (see :class:`cryosam_ray.encoders.rings.RingEncoder`)."""

    sigmas: tuple[float, ...] = Field((1.5, 2.5, 4.0, 6.0), description="Laplacian-of-Gaussian (blob) scales, pixels.")
    ring_radii: tuple[float, ...] = Field((0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0),
                                          description="Radii of the ring means (radial profile), pixels.")
    smoothing: float = Field(1.0, ge=0, description="Gaussian smoothing before the ring means, pixels.")
    stride: int = Field(2, ge=1, description="Pixels per token along each slice axis.")


# The old encoder.dinov2.dtype values, as precision values (its "auto" meant float16 on a GPU).
_DINOV2_DTYPE_TO_PRECISION = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Dinov2Config(_Section):
    """DINOv2 through transformers (see :class:`cryosam_ray.encoders.dinov2.Dinov2Encoder`)."""

    model: str = Field("facebook/dinov2-with-registers-large",
                       description="Local folder, s3:// URL or hub id. Default: ViT-L/14 with registers, as the "
                       "public CryoSAM code; facebook/dinov2-large is the same network without registers.")
    image_size: int = Field(518, ge=14, description="Slices are resized to this (a multiple of the patch size).")
    keep_aspect: bool = Field(False, description="Keep the slice's aspect ratio (the public code does not).")
    batch_size: int = Field(16, ge=1, description="Slices per forward pass (GPU memory grows with it).")
    device: str | None = Field(None, description="cuda, cuda:N or cpu (None: cuda when available).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Forward-pass precision. " + _PRECISION_DOC + " Replaces dtype (float32 -> fp32, "
        "bfloat16 -> bf16, float16 -> fp16; its auto meant fp16 on a GPU, now bf16).")
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="transformers' attn_implementation: sdpa (scaled-dot-product / flash attention) or eager.")
    compile: bool = Field(False, description="Wrap the model in torch.compile (slow first batch).")
    cache_dir: str | None = Field(None, description="Where downloaded weights are kept.")
    allow_hub: bool = Field(True, description="Allow loading a hub id (a download the user asked for by naming it).")

    @model_validator(mode="before")
    @classmethod
    def _dtype_is_now_precision(cls, data: Any) -> Any:
        """Accept the old ``dtype`` key, with a warning naming the new one."""
        if not isinstance(data, dict) or "dtype" not in data:
            return data
        data = dict(data)
        old = data.pop("dtype")
        if old not in _DINOV2_DTYPE_TO_PRECISION:
            raise ValueError(f"dtype is replaced by precision; expected precision: auto, fp32, bf16 or fp16 "
                             f"(got dtype {old!r})")
        new = _DINOV2_DTYPE_TO_PRECISION[old]
        if data.get("precision", new) != new:
            raise ValueError(f"both dtype ({old!r}) and precision ({data['precision']!r}) are set; keep precision")
        data["precision"] = new
        warnings.warn(f"encoder.dinov2.dtype is deprecated: write precision: {new} (dtype {old!r} was read as that; "
                      "auto now means bf16 on GPUs with native bfloat16, fp32 elsewhere)", FutureWarning, stacklevel=2)
        return data


class EncoderConfig(_Section):
    """The slice encoder, picked by name."""

    backend: Literal["filterbank", "rings", "dinov2"] = Field(
        "filterbank", description="filterbank or rings (weight-free), or dinov2.")
    filterbank: FilterBankConfig = Field(default_factory=FilterBankConfig)
    rings: RingsConfig = Field(default_factory=RingsConfig)
    dinov2: Dinov2Config = Field(default_factory=Dinov2Config)


class FeaturesConfig(_Section):
    """The feature store."""

    store: str | None = Field(None, description="zarr store URL (local or s3://); None: <out>/features for "
                              "`cryosam run`, memory otherwise.")
    shard_slices: int = Field(16, ge=1, description="Slices per stored chunk (and per encoding task).")


class MatchingConfig(_Section):
    """Hierarchical Feature Matching (see :func:`cryosam_ray.matching.hierarchical_match`)."""

    method: Literal["hierarchical", "naive"] = Field("hierarchical", description="naive: every voxel, for comparison.")
    similarity: Literal["cosine", "projection"] = Field(
        "cosine", description="cosine: the paper's; projection: the feature projected on the query's direction "
        "from background, prompt = 1 (magnitude-aware: finds more small particles in real tomograms).")
    ratios: tuple[int, ...] | Literal["auto"] = Field(
        "auto", description="Pyramid ratios, coarse to fine; auto: from the prompt instances' radius (finest <= r/2).")
    tau_sim: float | None = Field(0.5, description="Cells below this similarity are dropped (the paper: 0.5); "
                                  "null: calibrated, each coarser level keeps its best keep_fraction of cells.")
    keep_fraction: float = Field(0.25, gt=0, le=1, description="Share of cells kept per coarser level when tau_sim is null.")
    dilate: int = Field(1, ge=0, description="Cells of margin kept around kept cells between levels.")
    nms_radius: float | None = Field(None, gt=0, description="NMS radius in voxels (None: the prompt instances' radius).")
    top_k: int = Field(512, ge=1, description="Proposals kept per class and tomogram (K).")


class InstancesConfig(_Section):
    """How proposals become particles: propagation in batches, merging, filters."""

    batch: int = Field(64, ge=1, description="Proposals propagated together; later ones inside found particles are skipped.")
    min_size_ratio: float | None = Field(0.5, ge=0, description="Smallest particle, relative to the prompt instances' "
                                         "median size (null: no limit); for a single prompt, relative to the smaller "
                                         "of its size and its strong candidates' median (see stages/sizes.py).")
    max_size_ratio: float | None = Field(2.0, gt=0, description="Largest particle, relative to the prompt instances' "
                                         "median size (null: no limit); twice that for a single prompt, whose mask "
                                         "size is one noisy sample.")
    min_score: float | Literal["auto"] | None = Field(
        "auto", description="Smallest particle score (in the units of density.score: density z units; features: "
        "cosine with the query, or projection with prompt = 1); auto: the split (Otsu) of the run's score "
        "distribution per class (density: never above the median score of the class's prompts on the tomogram); "
        "null: keep every particle (the paper).")
    overlap: float = Field(0.3, gt=0, le=1, description="Masks sharing this fraction of the smaller one are one particle.")


class DensityConfig(_Section):
    """Density at the prompts' scale (see :mod:`cryosam_ray.density`): blob proposals and the
    density score, weight-free and the same for any encoder. The paper uses neither."""

    blobs: bool = Field(True, description="Add blobs at the prompts' scale (LoG at r / sqrt 3, the prompts' "
                        "polarity) to each class's feature-matching proposals.")
    score: Literal["density", "features"] = Field(
        "density", description="What ranks, cuts and resolves particles: density (blob contrast + shell profile "
        "against the prompts', robust z-scores over the candidates) or features (the query similarity).")
    shells: int = Field(8, ge=2, description="Concentric shells of the profile.")
    reach: float = Field(2.0, gt=0.5, description="Outer shell radius, in particle radii.")
    pool: int = Field(2048, ge=16, description="Blob candidates per class and tomogram the score statistics and "
                      "the best proposals are drawn from (the best matching.top_k are propagated).")
    stacks: bool = Field(True, description="With the density score: cut a mask holding particles stacked along z "
                         "between their blobs, and centre a particle of a class whose prompts hold several blobs "
                         "(a filament, a dimer) between them (cryosam_ray/stages/stacks.py).")


class PoolConfig(_Section):
    """One actor pool: how many actors and what each one holds."""

    size: int = Field(1, ge=1, description="Actors in the pool.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on GPU nodes; fractional to share one; 0 on CPU).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor (fractional on small machines).")


class RayConfig(_Section):
    """The Ray wiring of ``cryosam run`` (see :mod:`cryosam_ray.executors.on_ray`)."""

    address: str = Field("local", description="local: start a Ray for this run; auto: the running cluster; "
                         "ray://host:10001: a remote cluster; none: run in this process without Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None: all).")
    encoders: PoolConfig = Field(default_factory=PoolConfig, description="Slice-encoder actors.")
    segmenters: PoolConfig = Field(default_factory=PoolConfig, description="Propagation (segmenter) actors.")
    embedders: PoolConfig = Field(default_factory=PoolConfig, description="SAM image-embedding actors (used when "
                                  "segmenter.sam.embedding_store is set: slices are embedded ahead into it).")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per plain task (statistics, matching, writing).")
    max_inflight_shards: int = Field(8, ge=1, description="Encoding shards in flight at once (bounds memory).")
    max_inflight_tomograms: int = Field(4, ge=1, description="Tomograms between encoding and writing at once.")
    max_restarts: int = Field(3, ge=0, description="Restarts of a crashed actor.")
    max_retries: int = Field(3, ge=0, description="Retries of a task or actor call lost to a crash.")
    stall_timeout_s: float = Field(
        900.0, ge=5, description="When no work finishes for this long (a lost node whose work cannot be placed on "
        "what is left, a task waiting for CPUs the actors hold), the unfinished tomograms fail with the cluster's "
        "resources in the message instead of the run waiting forever.")

    @field_validator("address")
    @classmethod
    def _known_address(cls, value: str) -> str:
        if value in ("local", "auto", "none") or re.fullmatch(r"(ray://)?[\w.\-]+:\d+", value):
            return value
        raise ValueError(f"{value!r}: expected local, auto, none, HOST:PORT (the head's GCS) or ray://HOST:PORT")


class CryoSamConfig(_Section):
    """The whole job configuration."""

    io: IOConfig = Field(default_factory=IOConfig)
    copick: CopickSection = Field(default_factory=CopickSection)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    propagation: PropagationConfig = Field(default_factory=PropagationConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    matching: MatchingConfig = Field(default_factory=MatchingConfig)
    instances: InstancesConfig = Field(default_factory=InstancesConfig)
    density: DensityConfig = Field(default_factory=DensityConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> CryoSamConfig:
    """Read a YAML config (or the defaults), apply dotted-key overrides, validate once.

    ``path`` may be a file or the name of a file in ``configs/`` (``"demo"``).

    Raises:
        ConfigError: missing or unparsable file, unknown key, or a value of the wrong type or range;
            the message names the file and the key.
    """
    source = "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        file = _resolve_config_path(path)
        source = str(file)
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of sections at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return CryoSamConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config:\n{_format_errors(exc)}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"synth.snr=0.5"`` -> ``("synth.snr", 0.5)``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example synth.snr=0.5")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote "
                          f"strings with brackets or colons") from exc


def _resolve_config_path(path: str | os.PathLike) -> Path:
    file = Path(path)
    if file.exists():
        return file
    named = CONFIG_DIR / f"{path}.yaml"
    if named.exists():
        return named
    raise ConfigError(f"{path}: config file not found (also looked for {named})")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        lines.append(f"  {key}: {err['msg']} (got {got!r})")
    return "\n".join(lines)
