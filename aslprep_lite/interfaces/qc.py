"""Quality control of a run: SCORE/SCRUB over :mod:`aslprep_lite.quant.score` and the QC row
of :mod:`aslprep_lite.quant.qc`."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from aslprep_lite.images import load_image, save_image
from aslprep_lite.quant import qc as qc_model
from aslprep_lite.quant import score as score_model
from aslprep_lite.quant.deltam import plan_subtraction, timeseries_sources
from aslprep_lite.quant.tissue import tissue_classes

LOGGER = logging.getLogger("aslprep_lite")

#: The confounds column of the volumes SCORE removed (ASLPrep's name).
OUTLIER_COLUMN = "score_outlier_index"
#: The SCRUB weight function: Huber's, as the author's code and ASLPrep use.
SCRUB_WFUN = "huber"


def outlier_index(kept: np.ndarray, context: list[str]) -> list[int]:
    """1 for every series volume that went into a CBF volume SCORE removed, else 0.

    Both volumes of a removed pair are flagged; volumes not in the CBF series (m0scan, noRF,
    unpaired) are 0.
    """
    flags = [0] * len(context)
    for sources, keep in zip(timeseries_sources(context), kept, strict=True):
        if not keep:
            for index in sources:
                flags[index] = 1
    return flags


class _ScoreInputSpec(BaseInterfaceInputSpec):
    timeseries_file = File(exists=True, mandatory=True, desc="CBF of every volume")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    tissue_file = File(exists=True, mandatory=True, desc="GM, WM (CSF) fractions, ASL grid")
    context = traits.List(traits.Str, mandatory=True, desc="volume type of each volume")


class _ScoreOutputSpec(TraitedSpec):
    score_file = File(exists=True, desc="SCORE mean CBF")
    scrub_file = File(exists=True, desc="SCRUB CBF")
    metadata = traits.Dict(desc="the maps' sidecar fields: the SCORE/SCRUB record")
    outliers = traits.List(traits.Int, desc="per series volume: 1 removed by SCORE, 0 kept")


class ScoreScrub(SimpleInterface):
    """SCORE (Dolui et al. 2017) and SCRUB (Dolui et al. 2016) on a run's CBF time series."""

    input_spec = _ScoreInputSpec
    output_spec = _ScoreOutputSpec

    def _run_interface(self, runtime):
        series, img = load_image(self.inputs.timeseries_file)
        mask = load_image(self.inputs.mask_file)[0] > 0.5
        gm, wm, csf = tissue_classes(load_image(self.inputs.tissue_file)[0])
        try:
            result = score_model.score(series, gm, wm, csf, mask)
            scrubbed = score_model.scrub(
                series, gm, wm, csf, mask, wfun=SCRUB_WFUN, score_result=result
            )
            record = score_model.score_record(result, scrub_wfun=SCRUB_WFUN)
        except ValueError as err:  # no pure GM voxel on the ASL grid: nothing to judge by
            LOGGER.warning(
                "%s: SCORE/SCRUB not applied (%s); the score and scrub maps are the plain mean",
                self.inputs.timeseries_file,
                err,
            )
            n_volumes = series.shape[-1] if series.ndim == 4 else 1
            mean = np.where(mask, series.reshape(*mask.shape, n_volumes).mean(axis=-1), 0.0)
            result = score_model.ScoreResult(
                cbf=mean.astype(np.float32),
                removed=(),
                kept=np.ones(n_volumes, dtype=bool),
                flags=np.zeros(n_volumes, dtype=np.int8),
                thresh=score_model.DEFAULT_THRESH,
                mad_factor=score_model.DEFAULT_MAD_FACTOR,
                note=f"SCORE/SCRUB not applied: {err}; both maps are the plain mean",
            )
            scrubbed = result.cbf
            record = score_model.score_record(result)
        cwd = runtime.cwd
        self._results["score_file"] = save_image(
            result.cbf, img, os.path.join(cwd, "cbf_score.nii")
        )
        self._results["scrub_file"] = save_image(scrubbed, img, os.path.join(cwd, "cbf_scrub.nii"))
        self._results["metadata"] = {"SCORE": record}
        self._results["outliers"] = outlier_index(result.kept, list(self.inputs.context))
        return runtime


class _ScoreConfoundsInputSpec(BaseInterfaceInputSpec):
    confounds_file = File(exists=True, mandatory=True, desc="the run's confounds TSV")
    confounds_metadata = traits.Dict(mandatory=True, desc="its sidecar")
    outliers = traits.List(traits.Int, mandatory=True, desc="1 per volume SCORE removed")


class _ScoreConfoundsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the confounds TSV with score_outlier_index")
    metadata = traits.Dict(desc="its sidecar, with the column's description")


class ScoreConfounds(SimpleInterface):
    """Append SCORE's removed volumes to the confounds table as ``score_outlier_index``."""

    input_spec = _ScoreConfoundsInputSpec
    output_spec = _ScoreConfoundsOutputSpec

    def _run_interface(self, runtime):
        with open(self.inputs.confounds_file, encoding="utf-8") as fobj:
            lines = fobj.read().splitlines()
        outliers = list(self.inputs.outliers)
        if len(lines) - 1 != len(outliers):
            raise ValueError(
                f"{self.inputs.confounds_file}: {len(lines) - 1} rows for {len(outliers)} volumes"
            )
        rows = [f"{lines[0]}\t{OUTLIER_COLUMN}"]
        rows += [f"{line}\t{flag}" for line, flag in zip(lines[1:], outliers, strict=True)]
        out_file = os.path.join(runtime.cwd, "confounds.tsv")
        with open(out_file, "w", encoding="utf-8") as fobj:
            fobj.write("\n".join(rows) + "\n")
        self._results["out_file"] = out_file
        self._results["metadata"] = {
            **self.inputs.confounds_metadata,
            OUTLIER_COLUMN: {
                "Description": "1 for the volumes SCORE (Dolui et al. 2017) removed from the "
                "desc-score and desc-scrub CBF maps (both volumes of a removed control/label "
                "pair), 0 for the others; the main CBF map averages every pair",
                "Levels": {"0": "kept", "1": "removed by SCORE"},
                "Reference": score_model.SCORE_REFERENCE,
            },
        }
        return runtime


class _QCInputSpec(BaseInterfaceInputSpec):
    cbf_file = File(exists=True, mandatory=True, desc="the run's CBF map as written")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    tissue_file = File(exists=True, desc="GM, WM (CSF) fractions on the ASL grid")
    tissue_source = traits.Str(mandatory=True, desc="where the tissue maps come from")
    confounds_file = File(exists=True, desc="confounds TSV (framewise_displacement, rmsd)")
    context = traits.List(traits.Str, mandatory=True, desc="volume type of each volume")
    coregistration = traits.Dict(desc="record holding Coregistration (Dice)")
    anatomy = traits.Dict(desc="the T1w record holding Normalization (Correlation)")
    att_file = File(exists=True, desc="multi-delay: ATT map")
    fit_failed_file = File(exists=True, desc="multi-delay: fit-failure mask")
    score_metadata = traits.Dict(desc='{"SCORE": record}, or why SCORE does not apply')


class _QCOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="desc-qualitycontrol_cbf.tsv")
    metadata = traits.Dict(desc="its sidecar: every column, the tissue source")


class QualityControl(SimpleInterface):
    """One row of ``desc-qualitycontrol_cbf.tsv`` (:func:`aslprep_lite.quant.qc.qc_row`)."""

    input_spec = _QCInputSpec
    output_spec = _QCOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs

        def given(name: str) -> Any:
            value = getattr(inputs, name)
            return value if isdefined(value) else None

        cbf, img = load_image(inputs.cbf_file)
        mask = load_image(inputs.mask_file)[0] > 0.5
        if given("tissue_file"):
            gm, wm, csf = tissue_classes(load_image(inputs.tissue_file)[0])
        else:  # no tissue maps: the tissue columns are n/a
            gm = wm = csf = np.full(mask.shape, np.nan)
        confounds = (
            qc_model.read_confounds(inputs.confounds_file) if given("confounds_file") else {}
        )
        plan = plan_subtraction(inputs.context)
        pairs = sum(1 for label in plan.label if label >= 0)
        coregistration = (given("coregistration") or {}).get("Coregistration")
        normalization = (given("anatomy") or {}).get("Normalization")
        att = load_image(inputs.att_file)[0] if given("att_file") else None
        failed = load_image(inputs.fit_failed_file)[0] if given("fit_failed_file") else None
        row = qc_model.qc_row(
            cbf, mask, gm, wm, csf,
            zooms=img.header.get_zooms()[:3],
            fd=confounds.get("framewise_displacement"),
            rmsd=confounds.get("rmsd"),
            # the main CBF averages every pair: none is removed (SCORE's removals are in the
            # SCORE block of the sidecar and the confounds' score_outlier_index)
            pairs_used=pairs or None,
            pairs_removed=0 if pairs else None,
            coregistration=coregistration,
            normalization=normalization,
            att=att,
            fit_failed=failed,
        )  # fmt: skip
        out_file = os.path.join(runtime.cwd, "qualitycontrol.tsv")
        qc_model.write_qc_tsv([row], out_file)
        metadata = qc_model.qc_sidecar(inputs.tissue_source)
        metadata.update(given("score_metadata") or {})
        self._results["out_file"] = out_file
        self._results["metadata"] = metadata
        return runtime
