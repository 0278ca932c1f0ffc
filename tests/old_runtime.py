"""Running exported TorchScript in an old PyTorch, the way deepImageJ and ilastik do.

deepImageJ's TorchScript engines are PyTorch 1.7.1 to 2.0.0. Debian's ``python3-torch``
(PyTorch 1.13.1, installed by ``.ci/run`` with apt) is such an old runtime; it lives in the
system Python (``/usr/bin/python3``, or ``DENOISEG_OLD_TORCH_PYTHON``), so the files run in a
subprocess there. Without it the tests skip with the reason, except in CI (``CI=true``),
where a missing old runtime is a failure: it would otherwise go unchecked silently.
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

OLD_PYTHON = Path(os.environ.get("DENOISEG_OLD_TORCH_PYTHON", "/usr/bin/python3"))
#: newest PyTorch that counts as an old runtime (deepImageJ's engines end at 2.0)
NEWEST_OLD_TORCH = (2, 0)

# Runs in the old Python: each (model, input, output) triple of .pt/.npy paths; prints the torch version.
_RUNNER = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
args = sys.argv[1:]
for model_path, input_path, output_path in zip(args[0::3], args[1::3], args[2::3]):
    module = torch.jit.load(model_path, map_location="cpu")
    module.eval()
    with torch.no_grad():
        output = module(torch.from_numpy(np.load(input_path)))
    np.save(output_path, output.numpy())
print(torch.__version__)
"""


def old_runtime_missing() -> str | None:
    """Why the old runtime cannot be used, or None when it can."""
    if not OLD_PYTHON.is_file():
        return f"{OLD_PYTHON} not found (apt-get install python3-torch)"
    probe = subprocess.run(
        [str(OLD_PYTHON), "-c", "import numpy, torch; print(torch.__version__)"],
        capture_output=True, text=True, timeout=120,
    )
    if probe.returncode != 0:
        return f"{OLD_PYTHON} has no torch (apt-get install python3-torch): {probe.stderr.strip().splitlines()[-1:]}"
    version = probe.stdout.strip()
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) > NEWEST_OLD_TORCH:
        return f"{OLD_PYTHON} has torch {version}, not an old runtime (<= {'.'.join(map(str, NEWEST_OLD_TORCH))})"
    return None


@pytest.fixture(scope="module")
def old_torch() -> str:
    """The old runtime's torch version; skips without it (fails in CI)."""
    reason = old_runtime_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"old PyTorch runtime required in CI: {reason}")
        pytest.skip(f"old PyTorch runtime unavailable: {reason}")
    return subprocess.run(
        [str(OLD_PYTHON), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, timeout=120
    ).stdout.strip()


def run_in_old_torch(jobs: dict[str, tuple[bytes, np.ndarray]], folder: Path) -> dict[str, np.ndarray]:
    """Run each named (TorchScript file content, input batch) in the old runtime, all in one process."""
    folder.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    for name, (torchscript, batch) in jobs.items():
        (folder / f"{name}.pt").write_bytes(torchscript)
        np.save(folder / f"{name}_input.npy", np.ascontiguousarray(batch, dtype=np.float32))
        args += [str(folder / f"{name}.pt"), str(folder / f"{name}_input.npy"), str(folder / f"{name}_output.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([str(OLD_PYTHON), "-c", _RUNNER, *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"the old runtime failed:\n{result.stderr[-3000:]}"
    return {name: np.load(folder / f"{name}_output.npy") for name in jobs}


def assert_agrees(actual: np.ndarray, expected: np.ndarray, what: str, tolerance: float = 1e-4) -> None:
    """``actual`` equals ``expected`` to ``tolerance`` times each output channel's range."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    channels = np.moveaxis(expected, 1, 0).reshape(expected.shape[1], -1)
    value_range = np.maximum(channels.max(axis=1) - channels.min(axis=1), 1e-6)
    error = np.abs(np.moveaxis(actual - expected, 1, 0).reshape(expected.shape[1], -1)).max(axis=1)
    assert (error <= tolerance * value_range).all(), f"{what}: max error per channel {error} for ranges {value_range}"


def package_member(package: Path, name: str) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read(name)


#: the pre/postprocessing deepImageJ (JDLL) implements: no softmax, no scale_mean_variance
DEEPIMAGEJ_PROCESSING = frozenset(
    {"ensure_dtype", "binarize", "clip", "scale_linear", "sigmoid", "zero_mean_unit_variance",
     "fixed_zero_mean_unit_variance", "scale_range"}
)


def check_package_runtimes(package: Path, folder: Path) -> dict[str, np.ndarray]:
    """What deepImageJ and ilastik need of a package: one input, one output, processing deepImageJ
    has; its TorchScript in the old runtime and its ONNX in onnxruntime agree, on the package's
    own (normalised) test input, with its TorchScript in this torch 2.x. Returns the outputs."""
    import io

    import onnx
    import yaml

    from denoiseg_core import exportability

    rdf = yaml.safe_load(package_member(package, "rdf.yaml"))
    assert len(rdf["inputs"]) == 1 and len(rdf["outputs"]) == 1
    processing = [step["id"] for step in rdf["inputs"][0].get("preprocessing", []) + rdf["outputs"][0].get("postprocessing", [])]
    assert set(processing) <= DEEPIMAGEJ_PROCESSING, processing
    test_input = np.load(io.BytesIO(package_member(package, "test_input.npy")))
    normalization = rdf["config"]["denoiseg"]["normalization"]
    shape = (1, -1) + (1,) * (test_input.ndim - 2)
    mean, std = (np.asarray(normalization[key], dtype=np.float32).reshape(shape) for key in ("mean", "std"))
    batch = ((test_input - mean) / std).astype(np.float32)

    torchscript = package_member(package, rdf["weights"]["torchscript"]["source"])
    onnx_bytes = package_member(package, rdf["weights"]["onnx"]["source"])
    current = exportability.run_torchscript(torchscript, batch)
    old = run_in_old_torch({"package": (torchscript, batch)}, folder)["package"]
    assert_agrees(old, current, f"{package.name}: TorchScript in the old runtime")
    onnx_output = exportability.run_onnx(onnx_bytes, batch)
    assert_agrees(onnx_output, current, f"{package.name}: ONNX in onnxruntime")

    proto = onnx.load_from_string(onnx_bytes)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 17
    assert proto.ir_version <= 8 and rdf["weights"]["onnx"]["opset_version"] <= 17
    assert exportability.torchscript_file_version(torchscript) <= exportability.MAX_TORCHSCRIPT_FILE_VERSION
    return {"torchscript": current, "old_torchscript": old, "onnx": onnx_output}
