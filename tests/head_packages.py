"""What a package exported with any head must say about that head (shared by the zoo and
third-party plugin tests): its channels, its instance settings, and its macro only if it has one."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import yaml

from denoiseg_zoo.export import DEFAULT_TAGS, MACRO_NAME


def check_head_package(package: Path, head, head_name: str, settings) -> dict:
    """Assert the package's description of ``head`` (built) with ``settings``; returns its rdf."""
    with zipfile.ZipFile(package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        members = set(archive.namelist())
        readme = archive.read(rdf["documentation"]["source"] if isinstance(rdf["documentation"], dict) else rdf["documentation"]).decode()
    channels = head.outputs().channels
    section = rdf["config"]["denoiseg"]
    (output,) = rdf["outputs"]
    names = [n for axis in output["axes"] if axis["type"] == "channel" for n in axis["channel_names"]]
    assert names == ["denoised", *(c.name for c in channels)]
    assert section["head"]["name"] == head_name
    assert [(c["name"], c["role"], c["channel"]) for c in section["head"]["channels"]] == [
        (c.name, c.role, 1 + i) for i, c in enumerate(channels)
    ]
    assert section["output_channels"]["probabilities"] == list(range(1, 1 + len(channels)))
    assert section["instance_settings"] == json.loads(settings.model_dump_json())
    assert section["instances"]["description"] == head.instances_text(settings) and head.instances_text(settings) in readme
    macro = head.imagej_macro(settings, 1)
    assert (MACRO_NAME in members) == (macro is not None) == (section["instances"]["imagej_macro"] == MACRO_NAME)
    postprocess = rdf["config"]["deepimagej"]["prediction"]["postprocess"]
    assert postprocess == ([{"spec": "ij.IJ::runMacroFile", "kwargs": MACRO_NAME}] if macro else [{"spec": None}])
    assert set(DEFAULT_TAGS) <= set(rdf["tags"]) and "nuclei" not in rdf["tags"]
    assert f"segments** them with the `{head_name}` head" in readme and "3 classes" not in readme
    return rdf
