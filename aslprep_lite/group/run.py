"""The group level: read every run's QC row, flag outliers, average the template maps, report.

Everything is read and computed first; the outputs are then written under temporary names in
the output directory and renamed into place together, so an error leaves no group output
half-written (and the previous group outputs, if any, as they were).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from aslprep_lite.config import check_writable
from aslprep_lite.group.figures import distributions_png, mosaic_png
from aslprep_lite.group.inputs import GroupInputs, TemplateMap, collect_inputs
from aslprep_lite.group.maps import group_map
from aslprep_lite.group.report import MapSection, render_report
from aslprep_lite.group.table import GroupTable, dump_json, group_table, rule_text
from aslprep_lite.images import save_image

__all__ = ["GROUP_REPORT", "GROUP_TABLE", "run_group"]

LOGGER = logging.getLogger("aslprep_lite")

GROUP_TABLE = "group_desc-qualitycontrol_cbf.tsv"
GROUP_REPORT = "group.html"
FIGURES = "figures"
_STALE_MAPS = ("group_space-*_desc-*_cbf.*", "group_space-*_desc-count_mask.*")

Writer = Callable[[Path], None]


def _tissue_sources(table: GroupTable) -> list[str]:
    """``TissueSource`` of each run's QC sidecar (absent or unreadable ones left out)."""
    sources = []
    for run in table.runs:
        try:
            meta = json.loads(run.path.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("TissueSource"), str):
            sources.append(meta["TissueSource"])
    return sources


def _map_stem(template_map: TemplateMap) -> str:
    space, cohort, res = template_map.key
    stem = f"group_space-{space}"
    if cohort:
        stem += f"_cohort-{cohort}"
    if res:
        stem += f"_res-{res}"
    return stem


def _text(content: str) -> Writer:
    def write(path: Path) -> None:
        path.write_text(content, encoding="utf-8")

    return write


def _bytes(content: bytes) -> Writer:
    def write(path: Path) -> None:
        path.write_bytes(content)

    return write


def _plan_maps(
    inputs: GroupInputs, table: GroupTable, output_dir: Path
) -> tuple[dict[str, Writer], list[MapSection]]:
    """The group mean/SD maps of each template (outliers left out when the flags count)."""
    outputs: dict[str, Writer] = {}
    sections = []
    prefixes = {run.prefix for run in table.runs}
    # the flags are unreliable in a small group: then no run is left out
    excluded = {table.runs[i].prefix for i in table.outliers} if table.reliable else set()
    keys = sorted({m.key for m in inputs.maps}, key=lambda k: tuple(x or "" for x in k))
    for key in keys:
        maps = [m for m in inputs.maps if m.key == key and m.prefix in prefixes]
        used = [m for m in maps if m.prefix not in excluded]
        left_out = sorted(m.prefix for m in maps if m.prefix in excluded)
        if not maps:
            continue
        stem = _map_stem(maps[0])
        if not used:
            LOGGER.warning(
                "%s: every run with a map in this space is an outlier: no group map", stem
            )
            continue
        result = group_map([m.path for m in used], [m.mask for m in used])
        unmasked = sorted(m.prefix for m in used if m.mask is None)
        if unmasked:
            LOGGER.warning(
                "%s: no brain mask in this space for %s: their finite nonzero voxels are "
                "averaged instead",
                stem,
                ", ".join(unmasked),
            )
        # BIDS URIs into this dataset (the derivatives), as the participant sidecars name
        # their raw sources with bids:raw:
        sources = [f"bids::{m.path.relative_to(output_dir).as_posix()}" for m in used]
        coverage = (
            "voxel by voxel over the runs whose brain mask in this space "
            "(<prefix>_space-…_desc-brain_mask.nii.gz, beside the CBF map) covers the voxel "
            "and whose value there is finite (a run without that mask: its finite nonzero "
            "voxels); every run weighs the same, so a participant with several runs counts "
            "several times"
        )
        count_file = f"{stem}_desc-count_mask.nii.gz"
        for desc, data, what in (
            ("mean", result.mean, "Mean"),
            ("sd", result.sd, "Standard deviation (n - 1)"),
        ):
            name = f"{stem}_desc-{desc}_cbf.nii.gz"
            outputs[name] = _nifti(data, result.reference)
            outputs[name.replace(".nii.gz", ".json")] = _text(
                dump_json(
                    {
                        "Description": f"{what} of the runs' CBF maps in {stem[6:]}, "
                        f"{coverage}; 0 where no run (for the SD, fewer than two) covers the "
                        f"voxel. The number of runs per voxel: {count_file}",
                        "Units": "mL/100 g/min",
                        "RunsIncluded": len(used),
                        "Sources": sources,
                        "RunsWithoutMask": unmasked,
                        "OutliersExcluded": table.reliable,
                        "ExcludedRuns": left_out,
                        "ExclusionRule": (
                            "runs flagged as outliers on any metric of the group QC table "
                            f"(robust z-score, on the side of poor quality: {rule_text()}) "
                            "are left out"
                            if table.reliable
                            else f"no run left out: {table.n} runs are too few for reliable "
                            "outlier flags"
                        ),
                    }
                )
            )
        outputs[count_file] = _nifti(result.count, result.reference, dtype=np.uint16)
        outputs[count_file.replace(".nii.gz", ".json")] = _text(
            dump_json(
                {
                    "Description": f"Number of runs averaged in each voxel of the group maps "
                    f"in {stem[6:]}: the runs whose brain mask covers the voxel and whose "
                    "CBF there is finite (without a mask: nonzero and finite)",
                    "Units": "1",
                    "RunsIncluded": len(used),
                }
            )
        )
        mosaic = f"{FIGURES}/{stem}_desc-mosaic_cbf.png"
        outputs[mosaic] = _bytes(mosaic_png(result.mean, result.sd))
        sections.append(
            MapSection(
                title=stem[len("group_") :],
                mosaic=mosaic,
                mean_file=f"{stem}_desc-mean_cbf.nii.gz",
                sd_file=f"{stem}_desc-sd_cbf.nii.gz",
                included=[m.prefix for m in used],
                excluded=left_out,
            )
        )
    return outputs, sections


def _nifti(data: np.ndarray, reference, dtype: type = np.float32) -> Writer:
    def write(path: Path) -> None:
        save_image(data, reference, path, dtype=dtype)

    return write


def _commit(output_dir: Path, outputs: dict[str, Writer]) -> None:
    """Write every output under a temporary name, then rename them all into place."""
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in outputs.items():
            target = output_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            # the temporary name keeps the extension (write_nifti compresses by it)
            tmp = target.parent / f".tmp{os.getpid()}-{target.name}"
            staged.append((tmp, target))
            write(tmp)
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    # group maps and figures of an earlier group run that this one did not make (a template
    # no longer among the runs' spaces) would disagree with the new table
    written = {output_dir / name for name in outputs}
    for pattern in (*_STALE_MAPS, f"{FIGURES}/group_*.png"):
        for path in output_dir.glob(pattern):
            if path not in written:
                path.unlink(missing_ok=True)


def run_group(
    bids_dir: Path,
    output_dir: Path,
    *,
    participant_label: Sequence[str] = (),
    session_label: Sequence[str] = (),
    dry_run: bool = False,
) -> int:
    """Run the group level: the group QC table, its sidecar, the group maps and ``group.html``.

    Parameters
    ----------
    bids_dir, output_dir
        The raw dataset and the participant level's derivatives (where the group outputs go).
    participant_label, session_label
        Restrict the group to these participants / sessions (empty: all).
    dry_run
        Print what would be read as JSON and write nothing.

    Returns
    -------
    int
        0 (the group outputs were written).

    Raises
    ------
    AslprepError
        No QC file, a damaged QC table or map, maps of one space on different grids, an
        unknown participant label; then nothing is written.
    """
    inputs = collect_inputs(
        bids_dir,
        output_dir,
        participant_label=participant_label,
        session_label=session_label,
    )
    if dry_run:
        print(
            json.dumps(
                {
                    "qc_files": [str(run.path) for run in inputs.runs],
                    "template_maps": [str(m.path) for m in inputs.maps],
                    "without_outputs": [f"sub-{s}" for s in inputs.without_outputs],
                },
                indent=2,
            )
        )
        return 0
    check_writable(output_dir)
    table = group_table(inputs.runs)
    outputs: dict[str, Writer] = {
        GROUP_TABLE: _text(table.to_tsv()),
        GROUP_TABLE.replace(".tsv", ".json"): _text(
            dump_json(table.sidecar(_tissue_sources(table)))
        ),
    }
    map_outputs, sections = _plan_maps(inputs, table, output_dir)
    distributions = f"{FIGURES}/group_desc-qcmetrics_boxplot.png"
    outputs[distributions] = _bytes(distributions_png(table))
    outputs.update(map_outputs)
    outputs[GROUP_REPORT] = _text(
        render_report(
            table, inputs, distributions=distributions, maps=sections, table_file=GROUP_TABLE
        )
    )
    _commit(output_dir, outputs)

    if not table.reliable:
        LOGGER.warning(
            "only %d run(s) in the group: outlier flags need at least 5 to be reliable",
            table.n,
        )
    for i in table.outliers:
        LOGGER.warning(
            "%s: outlier on %s (robust z-score beyond 3.5)",
            table.runs[i].prefix,
            ", ".join(table.flagged(i)),
        )
    if inputs.without_outputs:
        LOGGER.warning(
            "participant(s) without quality-control outputs: %s",
            ", ".join(f"sub-{label}" for label in inputs.without_outputs),
        )
    LOGGER.info(
        "group level: %d run(s), %d outlier(s); %s",
        table.n,
        len(table.outliers),
        output_dir / GROUP_REPORT,
    )
    return 0
