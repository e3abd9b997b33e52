"""nipype's SLURM plugin, through ``--use-plugin``, on a real Slurm cluster.

One participant is processed twice, with MultiProc and with every node submitted as a Slurm
job (``sbatch``), and the derivatives must be byte-identical.

The cluster is the one ``SLURM_CONF`` (or the project's recipe directory) points to when it
answers; otherwise, when the Slurm daemons and munge are installed and this runs as root, the
single-node cluster of ``.ci/recipes/slurm-up.sh`` is brought up here and stopped afterwards.
Without Slurm the test is skipped (it fails instead when ``ASLPREP_LITE_REQUIRE_SLURM=1``, as
``.ci/slurm.sh`` sets after installing the Debian packages and bringing the cluster up).
nipype's SLURM plugin needs the work directory on a filesystem the compute node sees (here
the same machine) and the same Python environment there (the batch scripts call
``sys.executable``).

Every step is bounded in time: each command has a timeout, each Slurm job a ``--time`` limit,
and jobs left behind by a failed run are cancelled.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from aslprep_lite.synthetic import SyntheticSpec, write_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / ".ci" / "recipes"
SLURM_DIR = Path(os.environ.get("ASLPREP_SLURM_DIR", "/tmp/aslprep-slurm"))

#: Wall-clock limit of one aslprep-lite invocation (s) and of one Slurm job (min).
CLI_TIMEOUT = 420
JOB_MINUTES = 5

#: PCASL with background suppression, a separate M0 and 1 mm of motion: every node of the graph
#: (registration, M0, CBF, confounds, derivatives) runs; small enough for a quick test.
SPEC = SyntheticSpec(
    subject="01", n_pairs=8, background_suppression=True, bs_pulses=4, motion_mm=1.0
)

#: What must be written, each compared byte for byte (plus every other file of the run).
EXPECTED = (
    "sub-01_cbf.nii.gz",
    "sub-01_cbf.json",
    "sub-01_desc-timeseries_cbf.nii.gz",
    "sub-01_desc-timeseries_cbf.json",
    "sub-01_desc-mean_deltam.nii.gz",
    "sub-01_desc-mean_deltam.json",
    "sub-01_desc-preproc_m0scan.nii.gz",
    "sub-01_desc-preproc_m0scan.json",
    "sub-01_desc-brain_mask.nii.gz",
    "sub-01_desc-brain_mask.json",
    "sub-01_desc-confounds_timeseries.tsv",
    "sub-01_desc-confounds_timeseries.json",
)


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _skip(reason: str) -> None:
    if os.environ.get("ASLPREP_LITE_REQUIRE_SLURM") == "1":
        pytest.fail(f"ASLPREP_LITE_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _recipe_daemons_alive() -> bool:
    """Whether the recipe's slurmctld (recorded pid) is running."""
    try:
        os.kill(int((SLURM_DIR / "run" / "slurmctld.pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def _answers(env: dict[str, str]) -> bool:
    """Whether a Slurm controller answers with a usable node."""
    if env.get("SLURM_CONF") == str(SLURM_DIR / "slurm.conf") and not _recipe_daemons_alive():
        return False  # sinfo would spend ~10 s retrying a controller that is not there
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = result.stdout.split()
    return result.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in states)


@pytest.fixture(scope="module")
def slurm_env():
    """An environment whose ``sbatch``/``squeue`` reach a working cluster."""
    if not (shutil.which("sbatch") and shutil.which("squeue") and shutil.which("sinfo")):
        _skip("Slurm is not installed (no sbatch/squeue/sinfo); .ci/slurm.sh installs it")
    env = dict(os.environ)
    env["NIPYPE_NO_ET"] = "1"
    # nipype's SLURM plugin names its jobs after $LOGNAME (KeyError without it)
    env["LOGNAME"] = env.get("LOGNAME") or getpass.getuser()
    if "SLURM_CONF" not in env and (SLURM_DIR / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    started = False
    if not _answers(env):
        daemons = all(shutil.which(d) for d in ("slurmctld", "slurmd", "munged", "runuser"))
        if not daemons or os.geteuid() != 0:
            _skip(
                "no Slurm cluster answers, and the single-node recipe needs root and the "
                "slurmctld, slurmd and munge packages (.ci/slurm.sh)"
            )
        env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
        up = _run(
            ["bash", str(RECIPES / "slurm-up.sh")], {**env, "S": str(SLURM_DIR)}, timeout=120
        )
        started = True
        assert up.returncode == 0, f"slurm-up.sh failed:\n{up.stdout}\n{up.stderr}"
        assert _answers(env), "the cluster came up but sinfo shows no usable node"
    yield env
    if started:
        _run(["bash", str(RECIPES / "slurm-down.sh")], {**env, "S": str(SLURM_DIR)}, timeout=60)


def _cancel_jobs(env: dict[str, str], comment: str) -> None:
    """Cancel the jobs this test submitted that are still queued or running."""
    try:
        queue = subprocess.run(
            ["squeue", "-h", "-o", "%i %k"], env=env, capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    jobs = [line.split()[0] for line in queue.splitlines() if line.split()[1:] == [comment]]
    if jobs:
        subprocess.run(["scancel", *jobs], env=env, capture_output=True, timeout=30)


def test_slurm_plugin_matches_multiproc(slurm_env, tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SPEC], name="slurm test")
    cli = [sys.executable, "-m", "aslprep_lite", str(bids)]
    # the same --omp-nthreads for both (results are identical for a fixed value)
    common = ["participant", "--omp-nthreads", "1"]

    start = time.monotonic()
    multiproc = _run(
        [*cli, str(tmp_path / "multiproc"), *common, "--nprocs", "2", "-w", str(tmp_path / "w1")],
        slurm_env,
        CLI_TIMEOUT,
    )
    t_multiproc = time.monotonic() - start
    assert multiproc.returncode == 0, multiproc.stderr

    comment = f"aslprep_lite-test-{uuid.uuid4().hex[:12]}"
    plugin = tmp_path / "slurm.yml"
    plugin.write_text(
        yaml.safe_dump(
            {
                "plugin": "SLURM",
                "plugin_args": {
                    "sbatch_args": f"--time={JOB_MINUTES} --cpus-per-task=1 --mem=1G "
                    f"--comment={comment}",
                    "max_tries": 2,
                    "retry_timeout": 2,
                },
            }
        )
    )
    work = tmp_path / "w2"  # a filesystem the compute node sees (the same machine here)
    start = time.monotonic()
    try:
        slurm = _run(
            [*cli, str(tmp_path / "slurm"), *common, "-w", str(work), "--use-plugin", str(plugin)],
            slurm_env,
            CLI_TIMEOUT,
        )
    finally:
        _cancel_jobs(slurm_env, comment)
    t_slurm = time.monotonic() - start
    print(f"MultiProc run {t_multiproc:.1f} s, SLURM plugin run {t_slurm:.1f} s")
    assert slurm.returncode == 0, slurm.stderr

    # the nodes really ran as Slurm jobs: the plugin's batch directory holds their logs
    job_logs = sorted(work.rglob("slurm-*.out"))
    assert job_logs, f"no Slurm job logs under {work}: did the SLURM plugin run?"

    perf_mp = tmp_path / "multiproc" / "sub-01" / "perf"
    perf_slurm = tmp_path / "slurm" / "sub-01" / "perf"
    names = sorted(p.name for p in perf_mp.iterdir())
    assert set(EXPECTED) <= set(names), f"missing: {set(EXPECTED) - set(names)}"
    assert names == sorted(p.name for p in perf_slurm.iterdir())
    differ = [n for n in names if (perf_mp / n).read_bytes() != (perf_slurm / n).read_bytes()]
    assert not differ, f"SLURM and MultiProc outputs differ: {differ}"
