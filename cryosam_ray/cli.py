"""The ``cryosam`` command line: one subcommand per user task.

Each subcommand loads the typed config once (``--config`` YAML, then ``--set key=value``
overrides, then its own flags), calls the stage code, and turns typed errors into one clear
line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from cryosam_ray import __version__
from cryosam_ray.config import CryoSamConfig, load_config, parse_override
from cryosam_ray.errors import ConfigError, CryoSamError, RunInterrupted

log = logging.getLogger("cryosam_ray")

EXIT_ERROR = 2


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML job config (a path, or a name in configs/ such as 'demo')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set synth.snr=0.5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryosam",
        description="Training-free cryo-ET tomogram segmentation (CryoSAM) over whole datasets on Ray.")
    parser.add_argument("--version", action="version", version=f"cryosam_ray {__version__}")
    parser.add_argument("--verbose", "-v", action="count", default=0,
                        help="more on the console: -v the progress log, -vv debug (default: warnings and errors; "
                        "cryosam run keeps the full log in DIR/run.log)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    synth = sub.add_parser("synth", help="write realistic synthetic tomograms with truth tables and labels",
                           description="Write DIR/<name>.mrc, DIR/<name>_labels.mrc, DIR/truth.csv and "
                           "DIR/prompts.csv.")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n", type=int, help="number of tomograms (config synth.n)")
    synth.add_argument("--seed", type=int, help="random seed (config synth.seed)")
    synth.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="volume shape, ZYX")
    synth.add_argument("--snr", type=float, help="signal-to-noise ratio (variance ratio)")
    synth.add_argument("--tilt-range", type=float, help="+- tilt range in degrees (missing wedge)")
    synth.add_argument("--polarity", choices=("raw", "inverted"), help="raw: dense is dark (default)")
    synth.add_argument("--voxel-size", type=float, help="voxel size in Angstrom")
    synth.add_argument("--builtin-shapes", action="store_true",
                       help="use built-in particle shapes even when the real density maps are present")
    synth.add_argument("--classes", nargs="+", metavar="CLASS",
                       help="particle classes: ribosome atpase hsp60 ball rod (config synth.classes)")
    synth.add_argument("--crowding", type=float, help="fraction of particles placed touching an earlier one, "
                       "in [0, 1] (config synth.crowding; default 0)")
    synth.add_argument("--prompts-per-class", type=int, metavar="N",
                       help="prompts.csv rows per class: the first N particles of each (config synth.prompts_per_class)")
    _config_args(synth)
    synth.set_defaults(func=cmd_synth)

    ev = sub.add_parser("evaluate", help="score picks against a truth table (and masks against labels)",
                        description="One-to-one (Hungarian) matching of picks to truth within a distance, "
                        "per class and per tomogram: TP, FP, FN, precision, recall, F1, F-beta; and, with picks "
                        "ranked by score, average precision (ap; mean over classes for tomograms and overall) "
                        "and the recall of the top 1x/2x/3x N_truth picks (r@1x ...).")
    ev.add_argument("--truth", required=True, help="truth table (truth.csv from cryosam synth)")
    ev.add_argument("--picks", required=True, help="picks table (.parquet or .csv)")
    dist = ev.add_mutually_exclusive_group()
    dist.add_argument("--distance-vox", type=float, help="match distance in voxels (default: half the radius)")
    dist.add_argument("--distance-a", type=float, help="match distance in Angstrom")
    ev.add_argument("--truth-labels", help="truth instance labels: an MRC file or a folder of <name>_labels.mrc")
    ev.add_argument("--pred-masks", help="predicted instance masks: an MRC file or a folder of "
                    "<name>_instances.mrc")
    ev.add_argument("--json", help="also write the report as JSON to this file")
    ev.add_argument("--report", metavar="DIR", help="rewrite DIR/report.html with this evaluation (quality table, "
                    "precision-recall curves, truth on the previews); default: the picks' folder when it holds "
                    "a run.json")
    _config_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    seg = sub.add_parser("segment", help="3D instance mask of each point prompt (Cross-Plane Self-Prompting)",
                         description="Writes DIR/picks.parquet, DIR/picks.csv (one row per prompt) and "
                         "DIR/masks/<tomogram>_instances.mrc (int labels, 0 = background).")
    seg.add_argument("--tomogram", required=True, help="tomogram: MRC or zarr, local path or s3:// URL")
    seg.add_argument("--prompts", required=True, help="prompt table: CSV (tomogram,z,y,x[,class]), STAR or copick JSON")
    seg.add_argument("--out", required=True, help="output folder (local or s3://)")
    seg.add_argument("--backend", choices=("classical", "sam"), help="segmenter backend (config segmenter.backend)")
    seg.add_argument("--checkpoint", help="SAM checkpoint: path, s3:// or http(s):// URL (segmenter.sam.checkpoint)")
    seg.add_argument("--directions", choices=("six", "z"), help="propagation directions (propagation.directions)")
    seg.add_argument("--voxel-size", type=float, help="voxel size in Angstrom instead of the header's")
    _config_args(seg)
    seg.set_defaults(func=cmd_segment)

    run = sub.add_parser("run", help="the full pipeline: prompts -> query -> matching -> every particle",
                         description="Writes DIR/picks.parquet, DIR/picks.csv, DIR/picks.star, "
                         "DIR/masks/<tomogram>_instances.mrc, DIR/masks/<tomogram>_semantic.mrc and DIR/run.json.")
    run.add_argument("--tomograms", nargs="+", help="tomogram files, folders or globs (local or s3://); "
                     "with --copick: the project's tomograms")
    run.add_argument("--prompts", required=True, help="prompt table: CSV (tomogram,z,y,x[,class]), STAR or copick "
                     "JSON; with --copick also copick:USER[/SESSION] (that user's picks, the object name their class)")
    run.add_argument("--out", required=True, help="output folder (local or s3://)")
    run.add_argument("--address", help="Ray: local (start one for this run, the default), auto (the running "
                     "cluster), ray://HOST:10001, or none (in this process, without Ray) (config ray.address)")
    run.add_argument("--fail-fast", action="store_true", help="stop at the first tomogram that fails")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (logging only)")
    run.add_argument("--incremental", action="store_true", help="process only tomograms without finished outputs "
                     "in --out (nightly runs over a growing folder); run.json lists new, done, skipped, failed")
    run.add_argument("--voxel-size", type=float, help="voxel size in Angstrom instead of the headers'")
    run.add_argument("--mask-format", choices=("mrc", "ome-zarr"), help="masks as MRC (default) or OME-Zarr "
                     "multiscale label images for napari / neuroglancer (config io.mask_format)")
    run.add_argument("--star-version", type=int, choices=(4, 5), help="picks.star for RELION 5 (centred "
                     "Angstrom, the default) or RELION 4 (voxels) (config io.star_version)")
    run.add_argument("--copick", metavar="CONFIG", help="a copick project config JSON: read its runs' tomograms "
                     "and write every class's picks and masks back as user copick.user (config copick.config)")
    run.add_argument("--voxel-spacing", type=float, help="with --copick: the voxel spacing (A) of the tomograms "
                     "to read (config copick.voxel_spacing)")
    run.add_argument("--tomo-type", help="with --copick: the tomogram type to read, e.g. wbp, denoised "
                     "(config copick.tomo_type)")
    run.add_argument("--runs", help="with --copick: comma-separated run names (default: every run)")
    run.add_argument("--copick-session", help="with --copick: session id of what is written (default: the run's "
                     "date, YYYYMMDD) (config copick.session)")
    run.add_argument("--wait-for-lock", action="store_true", help="when another run holds --out, wait for it "
                     "to end instead of refusing (its lease: DIR/.cryosam.lock)")
    _config_args(run)
    run.set_defaults(func=cmd_run)

    sm = sub.add_parser("submit", help="submit a cryosam run to a running Ray cluster (Jobs API)",
                        description="Submits the command after -- as a Ray job with id <name>-<YYYYMMDD>; "
                        "resubmitting the same day finds the same job. The token comes from RAY_AUTH_TOKEN.")
    sm.add_argument("--address", default=None, help="the head's job server, e.g. http://HEAD:8265 "
                    "(default: $RAY_ADDRESS, else http://127.0.0.1:8265)")
    sm.add_argument("--name", required=True, help="job name; the submission id is <name>-<YYYYMMDD>")
    sm.add_argument("--date", help="YYYYMMDD for the submission id (default: today)")
    sm.add_argument("--runtime-env", help="YAML/JSON Ray runtime environment (pip, env_vars, working_dir ...)")
    sm.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 1 unless it succeeded")
    sm.add_argument("job", nargs=argparse.REMAINDER, help="-- cryosam run ...")
    sm.set_defaults(func=cmd_submit)
    return parser


def _load(args: argparse.Namespace, flag_overrides: dict) -> CryoSamConfig:
    overrides = dict(parse_override(o) for o in args.overrides)
    overrides.update({k: v for k, v in flag_overrides.items() if v is not None})
    return load_config(args.config, overrides)


def cmd_synth(args: argparse.Namespace) -> int:
    from cryosam_ray.synth import SynthSettings, write_dataset

    cfg = _load(args, {
        "synth.n": args.n, "synth.seed": args.seed, "synth.shape": args.shape, "synth.snr": args.snr,
        "synth.tilt_range": args.tilt_range, "synth.polarity": args.polarity,
        "synth.voxel_size_a": args.voxel_size, "synth.use_real_maps": False if args.builtin_shapes else None,
        "synth.classes": args.classes, "synth.crowding": args.crowding,
        "synth.prompts_per_class": args.prompts_per_class,
    }).synth
    settings = SynthSettings(**cfg.model_dump(exclude={"n", "seed", "prompts_per_class"}))
    paths = write_dataset(args.out, n=cfg.n, seed=cfg.seed, settings=settings,
                          prompts_per_class=cfg.prompts_per_class)
    print(f"wrote {len(paths)} tomograms, their labels, truth.csv and prompts.csv to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cryosam_ray.evaluate import evaluate_picks
    from cryosam_ray.tables import read_picks, read_truth

    cfg = _load(args, {"evaluate.distance_vox": args.distance_vox, "evaluate.distance_a": args.distance_a}).evaluate
    report = evaluate_picks(read_truth(args.truth), read_picks(args.picks), distance_vox=cfg.distance_vox,
                            distance_a=cfg.distance_a, radius_fraction=cfg.radius_fraction, beta=cfg.beta)
    print(report.format_table())
    result = report.to_json()
    if args.truth_labels or args.pred_masks:
        if not (args.truth_labels and args.pred_masks):
            raise CryoSamError("--truth-labels and --pred-masks go together")
        result["masks"] = _evaluate_mask_files(args.truth_labels, args.pred_masks)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    folder = args.report or (str(Path(args.picks).parent) if (Path(args.picks).parent / "run.json").exists() else None)
    if folder:
        from cryosam_ray.report import write_report

        print(f"wrote {write_report(folder, evaluation=result, truth=read_truth(args.truth))}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from cryosam_ray.segment_command import run_segment

    cfg = _load(args, {"segmenter.backend": args.backend, "segmenter.sam.checkpoint": args.checkpoint,
                       "propagation.directions": args.directions, "io.voxel_size_a": args.voxel_size})
    from cryosam_ray.report import write_report

    output = run_segment(args.tomogram, args.prompts, args.out, cfg)
    for message in output.messages:
        print(f"warning: {message}", file=sys.stderr)
    found = sum(not inst.empty for inst in output.instances)
    report = write_report(args.out, storage_options=cfg.io.storage_options)
    print(f"segmented {found} of {len(output.instances)} prompts; wrote {', '.join(output.files + [report])}")
    return 0 if found else 1  # no mask at all: the outputs are there, but the command did not do its job


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args, {"io.voxel_size_a": args.voxel_size, "ray.address": args.address,
                       "io.star_version": args.star_version, "io.mask_format": args.mask_format,
                       "copick.config": args.copick, "copick.voxel_spacing": args.voxel_spacing,
                       "copick.tomo_type": args.tomo_type, "copick.session": args.copick_session,
                       "copick.runs": args.runs.split(",") if args.runs else None})
    cfg = _copick_inputs(args, cfg)
    with _run_log(args.out, cfg.io.storage_options):
        return _run(args, cfg)


def _copick_inputs(args: argparse.Namespace, cfg: CryoSamConfig) -> CryoSamConfig:
    """With a copick project: its tomograms as ``args.tomograms``, ``copick:USER`` prompts
    written to OUT/copick_prompts.csv (what the run reads, kept for the user to see), and the
    session id fixed for every worker. Returns the config."""
    from cryosam_ray.copick_io import PROMPTS_PREFIX, CopickError

    if not cfg.copick.config:
        if args.tomograms is None:
            raise ConfigError("cryosam run needs --tomograms (or --copick CONFIG)")
        if args.prompts.startswith(PROMPTS_PREFIX):
            raise CopickError(f"--prompts {args.prompts}: copick prompts need --copick CONFIG")
        return cfg
    from cryosam_ray.copick_io import PromptSource, prompt_rows, prompts_csv, tomogram_urls
    from cryosam_ray.storage import join, write_bytes_atomic

    if cfg.copick.session is None:  # one session for every worker of this run
        cfg = cfg.model_copy(update={"copick": cfg.copick.model_copy(update={"session": time.strftime("%Y%m%d")})})
    args.tomograms = (args.tomograms or []) + tomogram_urls(cfg.copick)
    if args.prompts.startswith(PROMPTS_PREFIX):
        rows = prompt_rows(cfg.copick, PromptSource.parse(args.prompts))
        args.prompts = write_bytes_atomic(join(args.out, "copick_prompts.csv"), prompts_csv(rows),
                                          storage_options=cfg.io.storage_options)
    return cfg


@contextlib.contextmanager
def _run_log(out: str, storage_options: dict):
    """The run's full log (INFO and up) in OUT/run.log, whatever the console shows."""
    from cryosam_ray.storage import is_remote, join, write_bytes_atomic

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        try:
            if is_remote(out) or Path(out).is_dir():
                write_bytes_atomic(join(out, "run.log"), buffer.getvalue().encode(), storage_options=storage_options)
        except OSError as exc:
            log.warning("could not write %s/run.log: %s", out, exc)


def _run(args: argparse.Namespace, cfg: CryoSamConfig) -> int:
    if cfg.ray.address == "none":
        from cryosam_ray.executors.in_process import run_in_process

        summary = run_in_process(args.tomograms, args.prompts, args.out, cfg, fail_fast=args.fail_fast,
                                 incremental=args.incremental, progress=not args.no_progress,
                                 wait_for_lock=args.wait_for_lock)
    else:
        from cryosam_ray.executors.on_ray import run_on_ray

        summary = run_on_ray(args.tomograms, args.prompts, args.out, cfg, fail_fast=args.fail_fast,
                             progress=not args.no_progress, incremental=args.incremental,
                             wait_for_lock=args.wait_for_lock)
    from cryosam_ray.report import write_report

    for record in summary.records:
        state = {"done": f"{len(record.picks)} picks", "skipped": f"{len(record.picks)} picks (done before)",
                 "failed": f"FAILED: {record.error}"}[record.status]
        print(f"{record.name}: {state}")
    report = write_report(args.out, storage_options=cfg.io.storage_options)
    out = args.out.rstrip("/")
    print(f"wrote {out}/picks.parquet, picks.csv, picks.star, masks/, previews/ and run.json; "
          f"open {report} for the previews, counts, scores and times")
    return 1 if summary.failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    import datetime as dt
    import os

    from cryosam_ray.submit import SubmitError, load_runtime_env, submit

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if args.date and not (len(args.date) == 8 and args.date.isdigit()):
        raise SubmitError(f"--date {args.date!r}: expected YYYYMMDD")
    date = dt.datetime.strptime(args.date, "%Y%m%d").date() if args.date else None
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        status = submit(job, address=address, name=args.name, runtime_env=load_runtime_env(args.runtime_env),
                        date=date, wait=args.wait)
    except SubmitError as exc:
        if args.wait and "ended" in str(exc):
            print(f"cryosam submit: {exc}", file=sys.stderr)
            return 1
        raise
    print(status)
    return 0


def _evaluate_mask_files(truth_labels: str, pred_masks: str) -> dict:
    """Dice / IoU per tomogram for label files, or folders paired by tomogram name."""
    from dataclasses import asdict

    from cryosam_ray.evaluate import evaluate_masks
    from cryosam_ray.tomo_io import read_mrc

    truth_path, pred_path = Path(truth_labels), Path(pred_masks)
    if truth_path.is_dir():
        pairs = {}
        for label_file in sorted(truth_path.glob("*_labels.mrc")):
            name = label_file.name[: -len("_labels.mrc")]
            candidate = pred_path / f"{name}_instances.mrc"
            if candidate.exists():
                pairs[name] = (label_file, candidate)
        if not pairs:
            raise CryoSamError(f"no <name>_labels.mrc in {truth_path} has a <name>_instances.mrc in {pred_path}")
    else:
        pairs = {truth_path.stem: (truth_path, pred_path)}
    results = {}
    for name, (t_file, p_file) in pairs.items():
        truth, _ = read_mrc(t_file)
        pred, _ = read_mrc(p_file)
        report = evaluate_masks(pred.astype("int64"), truth.astype("int64"))
        results[name] = asdict(report)
        print(f"{name}: dice {report.dice:.3f}  iou {report.iou:.3f}  instance dice {report.instance_dice:.3f}  "
              f"({report.matched}/{report.n_truth} truth instances matched, {report.n_pred} predicted)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = logging.StreamHandler()
    console.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if args.verbose
                                           else "%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, handlers=[console], force=True)
    _stop_on_sigterm()
    try:
        return args.func(args)
    except CryoSamError as exc:
        print(f"cryosam {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, RunInterrupted) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"cryosam {args.command}: stopped by {signal.Signals(signum).name}; what was finished is written "
              f"(a rerun resumes from it)", file=sys.stderr)
        return 128 + int(signum)


def _stop_on_sigterm() -> None:
    """SIGTERM (a cancelled Kubernetes pod or Ray job) stops the run as Ctrl-C does."""
    def stop(signum, frame):
        raise RunInterrupted(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
