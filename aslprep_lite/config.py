"""Options of a run, defined once in typed sections and checked once.

Three sections, as fMRIPrep's config has them:

- :class:`ExecutionOptions`: what to read, where to work, how nipype schedules, how loud. As in
  fMRIPrep, the anatomy of a finished sMRIPrep/fMRIPrep run to reuse (``anat_derivatives``) is
  an input, so it is here;
- :class:`QuantificationOptions`: every choice that changes the numbers; each field carries
  its sidecar name, so :meth:`QuantificationOptions.sidecar_record` writes them all from here.
  Partial-volume correction (``pvc``) is one of them: it acts only where a T1w segmentation
  exists (``applies="anatomy"``);
- :class:`OutputOptions`: where and in which spaces (:mod:`aslprep_lite.spaces`) the
  derivatives are written.

The command-line parser takes its defaults from these classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aslprep_lite.errors import AslprepError
from aslprep_lite.quant.robust import PAIR_AVERAGE_METHODS
from aslprep_lite.spaces import DEFAULT_OUTPUT_SPACES, Space, parse_output_spaces

#: Fixed seed for every random choice (registration sampling): identical inputs give
#: byte-identical outputs.
RANDOM_SEED = 20240


#: When an option acts on a run (so is recorded in its sidecars and handed to its nodes).
#: ``anatomy``: the run has a T1w segmentation (its own T1w, or ``--anat-derivatives``).
#: ``single-delay``: the run has one delay (its CBF is an average of per-pair volumes).
APPLIES = ("always", "single-delay", "multi-delay", "fitted", "voxel-calibration", "anatomy")

#: ``--pair-average`` choices: how the per-pair volumes of a single-delay run are averaged.
PAIR_AVERAGES = PAIR_AVERAGE_METHODS


def _option(default: Any, sidecar: str | None = None, *, applies: str = "always"):
    """A quantification option, the name it is recorded under (None: not recorded as a
    parameter) and when it acts (one of :data:`APPLIES`)."""
    assert applies in APPLIES
    return field(default=default, metadata={"sidecar": sidecar, "applies": applies})


@dataclass(frozen=True)
class ExecutionOptions:
    """What to process, where to work and how nipype runs it."""

    bids_dir: Path
    work_dir: Path = field(default_factory=lambda: Path("work"))
    analysis_level: str = "participant"
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    bids_filters: dict[str, Any] = field(default_factory=dict)
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    dry_run: bool = False
    stop_on_first_crash: bool = False
    plugin: str | None = None
    plugin_args: dict[str, Any] = field(default_factory=dict)
    verbosity: int = 0
    anat_derivatives: Path | None = None


@dataclass(frozen=True)
class QuantificationOptions:
    """Every option that changes the numbers, with the name it is recorded under."""

    m0_scale: float = _option(1.0, "M0Scale")
    smooth_kernel: float = _option(5.0, "M0SmoothingFWHM", applies="voxel-calibration")
    dummy_scans: int = _option(0, "DummyScans")
    att_method: str = _option("fit", "ATTMethod", applies="multi-delay")
    att_prior: str = _option("local", "ATTPrior", applies="fitted")
    arterial_component: bool = _option(False, "ArterialComponent", applies="fitted")
    m0_calibration: str = _option("voxel", "M0Calibration")
    m0_reference_mask: str | None = _option(None)  # written out as desc-m0reference_mask
    seed: int = _option(RANDOM_SEED, "RandomSeed")
    pvc: bool = _option(True, "PartialVolumeCorrection", applies="anatomy")
    # The mean by default: benchmarks/bench_robust.py measured the Huber estimate worse than
    # the mean on our simulations (median CBF error 8.97 % vs 8.81 % with motion, 11.19 % vs
    # 10.71 % with background suppression).
    pair_average: str = _option("mean", "PairAverage", applies="single-delay")

    def applies(self, name: str, *, multidelay: bool, anatomy: bool = False) -> bool:
        """Whether option ``name`` acts on a run under these options.

        An option that cannot change a run's numbers is neither recorded in its sidecars nor
        handed to its nodes, so changing it reruns nothing.

        Parameters
        ----------
        name
            A field of this class.
        multidelay
            Whether the run has several delays.
        anatomy
            Whether the run has a T1w segmentation (partial-volume correction needs one).
        """
        fitted = multidelay and self.att_method == "fit"
        return {
            "always": True,
            "single-delay": not multidelay,
            "multi-delay": multidelay,
            "fitted": fitted,
            "voxel-calibration": self.m0_calibration == "voxel",
            "anatomy": anatomy,
        }[self.__dataclass_fields__[name].metadata["applies"]]

    def sidecar_record(self, *, multidelay: bool, anatomy: bool = False) -> dict[str, Any]:
        """``ProcessingParameters`` of a run's sidecars: the options that act on it."""
        return {
            f.metadata["sidecar"]: getattr(self, f.name)
            for f in fields(self)
            if f.metadata["sidecar"]
            and self.applies(f.name, multidelay=multidelay, anatomy=anatomy)
        }


@dataclass(frozen=True)
class OutputOptions:
    """Where the derivatives go, and in which spaces (``asl``: the run's own grid)."""

    output_dir: Path
    output_spaces: tuple[Space, ...] = parse_output_spaces(DEFAULT_OUTPUT_SPACES)


@dataclass(frozen=True)
class Settings:
    """Validated options for one invocation of aslprep-lite, by section."""

    execution: ExecutionOptions
    quantification: QuantificationOptions
    outputs: OutputOptions


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def default_work_dir(output_dir: Path) -> Path:
    """``OUTPUT_DIR_work`` beside the outputs, or a per-user folder in $TMPDIR if that is not
    writable (a non-root container, a read-only image under Apptainer).

    The fallback name is fixed by the output directory and the user, so a rerun still finds
    (and resumes from) it.
    """
    beside = output_dir.parent / f"{output_dir.name}_work"
    existing = next(p for p in (beside, *beside.parents) if p.exists())
    if os.access(existing, os.W_OK):
        return beside
    key = hashlib.sha1(str(output_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"aslprep_lite_work-{os.getuid()}-{key}"


def build_settings(options: Any) -> Settings:
    """Check the command-line options and turn them into :class:`Settings`.

    Raises
    ------
    AslprepError
        Missing input, an output directory inside the input dataset, unwritable outputs,
        out-of-range numbers, a malformed ``--output-spaces`` value or a missing
        ``--anat-derivatives`` folder. (The template files of the output spaces are fetched
        later, by :func:`aslprep_lite.spaces.check_templates`.)
    """
    bids_dir = Path(options.bids_dir).expanduser().resolve()
    output_dir = Path(options.output_dir).expanduser().resolve()
    if not bids_dir.is_dir():
        raise AslprepError("input dataset directory does not exist", path=str(bids_dir))
    if _inside(output_dir, bids_dir):
        raise AslprepError(
            "output directory is inside the input dataset, which must stay untouched: "
            "choose a directory outside it",
            path=str(output_dir),
        )
    work_dir = (
        Path(options.work_dir).expanduser().resolve()
        if options.work_dir
        else default_work_dir(output_dir)
    )
    if _inside(work_dir, bids_dir):
        raise AslprepError(
            "work directory is inside the input dataset: choose a directory outside it",
            path=str(work_dir),
        )
    filters: dict[str, Any] = {}
    if options.bids_filter_file:
        try:
            filters = json.loads(Path(options.bids_filter_file).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AslprepError(
                f"cannot read the BIDS filter file: {err}", path=str(options.bids_filter_file)
            ) from None
        if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
            raise AslprepError(
                'must hold an object of objects such as {"asl": {"acquisition": "x"}}',
                path=str(options.bids_filter_file),
            )
    for name, value, low in (
        ("--nprocs", options.nprocs, 1),
        ("--omp-nthreads", options.omp_nthreads, 1),
        ("--dummy-scans", options.dummy_scans, 0),
    ):
        if value is not None and value < low:
            raise AslprepError(f"{name} must be >= {low}, not {value}")
    if not options.m0_scale > 0:
        raise AslprepError(f"--m0-scale must be > 0, not {options.m0_scale}")
    if options.smooth_kernel < 0:
        raise AslprepError(f"--smooth-kernel must be >= 0 mm, not {options.smooth_kernel}")
    plugin, plugin_args = (
        read_plugin_file(options.use_plugin) if options.use_plugin else (None, {})
    )
    if options.arterial_component and options.att_method != "fit":
        raise AslprepError("--arterial-component needs --att-method fit")
    reference_mask = None
    if options.m0_reference_mask:
        if options.m0_calibration == "voxel":
            raise AslprepError("--m0-reference-mask needs --m0-calibration csf or wm")
        reference_mask = str(Path(options.m0_reference_mask).expanduser().resolve())
        if not Path(reference_mask).is_file():
            raise AslprepError("reference mask file does not exist", path=reference_mask)
    # The parser leaves these out when they are not given: the defaults are defined here.
    output_spaces = parse_output_spaces(
        getattr(options, "output_spaces", None) or DEFAULT_OUTPUT_SPACES
    )
    anat_derivatives = None
    if getattr(options, "anat_derivatives", None):
        anat_derivatives = Path(options.anat_derivatives).expanduser().resolve()
        if not anat_derivatives.is_dir():
            raise AslprepError(
                "--anat-derivatives folder does not exist: give the output folder of a "
                "finished sMRIPrep or fMRIPrep run",
                path=str(anat_derivatives),
            )
    nprocs = options.nprocs or os.cpu_count() or 1
    omp = min(options.omp_nthreads or nprocs, nprocs)
    return Settings(
        execution=ExecutionOptions(
            bids_dir=bids_dir,
            work_dir=work_dir,
            analysis_level=options.analysis_level,
            participant_label=tuple(options.participant_label or ()),
            session_label=tuple(options.session_label or ()),
            bids_filters=filters,
            nprocs=nprocs,
            omp_nthreads=omp,
            mem_gb=options.mem_gb,
            dry_run=options.dry_run,
            stop_on_first_crash=options.stop_on_first_crash,
            plugin=plugin,
            plugin_args=plugin_args,
            verbosity=options.verbose - options.quiet,
            anat_derivatives=anat_derivatives,
        ),
        # the parser's destinations carry the field names: one place lists the options
        quantification=QuantificationOptions(
            **{
                f.name: getattr(options, f.name)
                for f in fields(QuantificationOptions)
                if hasattr(options, f.name) and f.name != "m0_reference_mask"
            },
            m0_reference_mask=reference_mask,
        ),
        outputs=OutputOptions(output_dir=output_dir, output_spaces=output_spaces),
    )


def read_plugin_file(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read an fMRIPrep-style nipype plugin file: ``plugin: NAME`` and optional ``plugin_args``.

    The plugin is handed to nipype as is (MultiProc, Linear, SLURM, SGE, PBS, ...): nipype's
    plugins do the scheduling.
    """
    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())  # YAML errors span several lines
        raise AslprepError(f"cannot read the plugin file: {reason}", path=str(path)) from None
    if not isinstance(content, dict) or not isinstance(content.get("plugin"), str):
        raise AslprepError("must hold 'plugin: NAME' (e.g. SLURM)", path=str(path))
    args = content.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise AslprepError("field 'plugin_args' must be a mapping", path=str(path))
    return content["plugin"], args


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove it is writable, or raise a one-line error."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".aslprep_lite-probe-"):
            pass
    except OSError as err:
        raise AslprepError(
            f"not writable ({err.strerror}): choose another directory or fix its permissions",
            path=str(directory),
        ) from None
